"""BIP324 under ``decrypt``, a whole read per call (capture/_v2.c): decrypt the complete
packets, make their capture records, re-encrypt them for the other leg, with the GIL
released for the cryptography. OpenSSL's ChaCha20 and ChaCha20-Poly1305 only.
"""

from msgcap.capture.bip324_cipher import CipherState

class Pipe:
    def __init__(self, recv: CipherState, send: CipherState, offset: int = 0) -> None: ...
    def feed(
        self, data: bytes | bytearray | memoryview, t0: int, /
    ) -> tuple[int, bytes, bytes, list[tuple[int, bytes]] | None, tuple[int, int, int, int] | None]:
        """``(count, records, out, dropped, error)``: the messages ``data`` completes,
        their capture records (the i-th stamped ``t0 + i``), their packets for the other
        leg, the packets Core drops ``(short_id, raw)``, and the error that ends the stream
        ``(reason 1 oversize / 2 bad tag, packet number, contents length, offset)``."""
    def seal(
        self, contents: bytes | bytearray | memoryview, aad: bytes = b"", ignore: bool = False, /
    ) -> bytes: ...
    def open(
        self, packet: bytes | bytearray | memoryview, aad: bytes = b"", /
    ) -> tuple[bool, bytes]: ...
    def state(
        self,
    ) -> tuple[
        tuple[bytes, bytes, int, int, int, int], tuple[bytes, bytes, int, int, int, int]
    ]: ...
    def discard(self) -> None: ...
    @property
    def incomplete(self) -> int: ...
    @property
    def decoys(self) -> int: ...
