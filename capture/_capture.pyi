"""Checksum checks and capture writes without the GIL (capture/_capture.c).

A write that fails part way (a full disk) is cut off again before OSError is raised: the
file still ends on a whole record.
"""

def write_checked(
    fd: int, frames: list[tuple[bytes, tuple[bytes | memoryview, ...], bytes]], /
) -> list[bool]: ...
