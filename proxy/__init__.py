"""The asyncio side of msgcap: listeners, routes, SOCKS5, relay pumps and the CLI."""
