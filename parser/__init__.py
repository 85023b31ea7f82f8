"""Typed codec for every P2P message Core's test framework knows, JSON rendering
compatible with Core's message-capture-parser.py, the parse and stats commands, the
Parquet dataset and SQL over it (dataset), and the Core functional-test export. Built on
:mod:`msgcap.capture` only; no asyncio."""
