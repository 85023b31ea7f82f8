"""The capture layer's one native module (capture/_capture.c, with capture/_v2.c compiled
in), loaded with ``msgcap.capture.native.load("msgcap.capture._capture")``; each function
and the type ``Pipe`` have a Python twin.

``write_checked``: checksum checks and capture writes without the GIL (twin:
capture/batch.py's ``python_write_checked``). A write that fails
part way (a full disk) is cut off again before OSError is raised: the file still ends on
a whole record. ``scan``, ``plan``, ``tally``: walks over whole capture records
(capture/records.py's ``python_scan``, capture/conversation.py's ``python_plan`` and
``python_tally``). ``Pipe`` (capture/_v2.c): BIP324's per-read step (twin: capture/bip324.py's
``V2Session``).
"""

from msgcap.capture.batch import WriteChecked
from msgcap.capture.bip324_cipher import CipherState
from msgcap.capture.conversation import Plan, TallyPlan
from msgcap.capture.records import Scan

MAX_RECORD_PAYLOAD: int

# Each has its Python twin's type (the twins document the arguments and results).
write_checked: WriteChecked
scan: Scan
plan: Plan
tally: TallyPlan

class Pipe:
    """BIP324 under ``decrypt``, a whole read per call: decrypt the complete packets, make
    their capture records, re-encrypt them for the other leg, with the GIL released for
    the cryptography. OpenSSL's ChaCha20 and ChaCha20-Poly1305 only."""

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
