"""Checksum checks and capture writes without the GIL (capture/_capture.c)."""

def write_checked(
    fd: int, frames: list[tuple[bytes, tuple[bytes | memoryview, ...], bytes]], /
) -> list[bool]: ...
