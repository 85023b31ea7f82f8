"""Typed codec for every P2P message Core's test framework knows, JSON rendering
compatible with Core's message-capture-parser.py, and the parse and stats commands."""
