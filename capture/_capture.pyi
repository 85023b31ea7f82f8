"""The capture layer's native module (capture/_capture.c), loaded with
``msgcap.capture.native.load("msgcap.capture._capture")``; each function has a Python twin.

``write_checked``: checksum checks and capture writes without the GIL. A write that fails
part way (a full disk) is cut off again before OSError is raised: the file still ends on
a whole record. ``scan``, ``plan``, ``tally``: walks over whole capture records
(capture/records.py's ``python_scan``, capture/conversation.py's ``python_plan`` and
``python_tally``).
"""

MAX_RECORD_PAYLOAD: int

def write_checked(
    fd: int, frames: list[tuple[bytes, tuple[bytes | memoryview, ...], bytes]], /
) -> list[bool]: ...
def scan(data: bytes, pos: int, limit: int, last: int, /) -> tuple[int, int | None, int]: ...
def plan(
    chunks: list[bytes], positions: list[int], times: list[int], /
) -> tuple[bytes, list[int], list[int | None], int]: ...
def tally(
    counts: list[dict[bytes, tuple[int, int]]],
    chunks: list[bytes],
    plan: bytes,
    since: int,
    until: int,
    types: tuple[bytes, ...] | None,
    /,
) -> None: ...
