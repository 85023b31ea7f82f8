"""msgcap: a capturing man-in-the-middle proxy for the Bitcoin P2P protocol.

The packages: :mod:`msgcap.capture` (framing, BIP324 and Core's capture format, no I/O
framework), :mod:`msgcap.parser` (typed messages and Core-compatible JSON),
:mod:`msgcap.proxy` (the asyncio proxy and replayer); this package holds the command line,
the pytest plugin and the errors they share.
"""

__version__ = "0.1.0"
