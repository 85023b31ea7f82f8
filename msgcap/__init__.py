"""msgcap: a capturing man-in-the-middle proxy for the Bitcoin P2P protocol.

The packages: :mod:`msgcap.capture` (framing, BIP324 and Core's capture format, no I/O
framework), :mod:`msgcap.parser` (typed messages and Core-compatible JSON),
:mod:`msgcap.proxy` (the asyncio proxy and replayer); this package, on top of them, holds
the command line, the test API (:mod:`msgcap.testing`) and its pytest plugin.
"""

__version__ = "0.1.0"
