"""The asyncio side of msgcap: listeners, routes, SOCKS5, the relay and the CLI."""
