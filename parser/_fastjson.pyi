MAX_RECORD_PAYLOAD: int

def render(msgtype: str, payload: bytes, reverse: bool, /) -> bytes | None: ...
def check(msgtype: str, payload: bytes | memoryview, /) -> bool: ...
def scan(data: bytes, pos: int, limit: int, last: int, /) -> tuple[int, int | None, int]: ...
def plan(
    chunks: list[bytes], positions: list[int], times: list[int], /
) -> tuple[bytes, list[int], list[int | None], int]: ...
def render_batch(
    out: bytearray,
    used: int,
    limit: int,
    chunks: list[bytes],
    plan: bytes,
    run: int,
    pos: int,
    looks: list[tuple[bytes, bytes]],
    opts: tuple[bytes, bytes, bool, int, int, tuple[bytes, ...] | None],
    first: bool,
    /,
) -> tuple[int, int, bool, int]: ...
def tally(
    counts: list[dict[bytes, tuple[int, int]]],
    chunks: list[bytes],
    plan: bytes,
    since: int,
    until: int,
    types: tuple[bytes, ...] | None,
    /,
) -> None: ...
