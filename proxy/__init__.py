"""The asyncio side of msgcap, on :mod:`msgcap.capture` and :mod:`msgcap.parser`:
listeners, routes, SOCKS5, the transparent route, the relay and its capture thread,
metrics, and the replayer. Its decisions are plain objects (policy, socks5, flow) that
the asyncio code feeds and obeys."""
