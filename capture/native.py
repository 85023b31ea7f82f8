"""The one way msgcap loads its optional native parts.

Each layer has one C extension next to its Python: ``msgcap.capture._capture``
(``capture/_capture.c``: capture writes, the walk and merge of capture records; with
``capture/_v2.c`` compiled in: BIP324's per-read step, the type ``Pipe``) and
``msgcap.parser._fastjson`` (``parser/_fastjson.c``: rendering to JSON); the record walk
the two share is ``capture/_records.h``. They are built by pip where a compiler is found
and always optional: without one, or with ``MSGCAP_PURE_PYTHON=1`` in the environment,
:func:`load` answers None and the caller runs its Python twin. The C library (for
``mallopt`` and ``malloc_trim``) comes from :func:`libc`.
"""

from __future__ import annotations

import ctypes
import importlib
import os
from types import ModuleType

PURE_PYTHON_ENV = "MSGCAP_PURE_PYTHON"


def pure_python() -> bool:
    """Whether the native parts are turned off (``MSGCAP_PURE_PYTHON`` set and not empty)."""
    return bool(os.environ.get(PURE_PYTHON_ENV))


def load(name: str) -> ModuleType | None:
    """The compiled module ``name`` (a full name, named by the layer it belongs to:
    ``load("msgcap.parser._fastjson")``), or None when it was not built or
    :func:`pure_python` is set."""
    if pure_python():
        return None
    try:
        return importlib.import_module(name)
    except ImportError:  # not compiled here: the Python twin is used
        return None


def libc() -> ctypes.CDLL | None:
    """The process's C library, or None where it cannot be opened (not glibc-like)."""
    try:
        return ctypes.CDLL(None)
    except OSError:
        return None
