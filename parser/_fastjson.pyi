"""The parser's native module (parser/_fastjson.c): message bodies to JSON text, whole
plans of capture records at a time (plans come from ``msgcap.capture._capture.plan`` or
its Python twin), and the dataset's payload check."""

def render(msgtype: str, payload: bytes, reverse: bool, /) -> bytes | None: ...
def check(msgtype: str, payload: bytes | memoryview, /) -> bool: ...
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
