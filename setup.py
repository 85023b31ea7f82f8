"""Build the optional native parts; everything else is in pyproject.toml.

One native module per layer, each loaded by ``msgcap.capture.native.load``:
``msgcap.capture._capture`` (capture/_capture.c, with BIP324's per-read step compiled in
from capture/_v2.c) and ``msgcap.parser._fastjson`` (parser/_fastjson.c). The record walk
that the two share is capture/_records.h. Both are optional: without a compiler (or, for
the capture module, OpenSSL's headers) msgcap uses its pure-Python code instead.
"""

from setuptools import Extension, setup

RECORDS_H = "capture/_records.h"

setup(
    ext_modules=[
        Extension(
            "msgcap.parser._fastjson",
            ["parser/_fastjson.c"],
            depends=[RECORDS_H],
            optional=True,  # without a compiler, msgcap falls back to parser/fastjson.py
            extra_compile_args=["-O2"],
        ),
        Extension(
            "msgcap.capture._capture",
            ["capture/_capture.c", "capture/_v2.c"],  # _v2.c: the type Pipe
            depends=[RECORDS_H],
            # without it the capture thread, bulk readers and BIP324 under decrypt run Python
            optional=True,
            libraries=["crypto"],
            extra_compile_args=["-O2"],
        ),
    ]
)
