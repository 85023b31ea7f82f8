"""Build the optional native parts; everything else is in pyproject.toml.

One native module per layer (capture/_capture.c, parser/_fastjson.c) plus BIP324's
per-read step (capture/_v2.c), each loaded by ``msgcap.capture.native.load``. The record
walk that the capture and parser modules share is capture/_records.h. All are optional:
without a compiler (or, for the capture modules, OpenSSL's headers) msgcap uses its
pure-Python code instead.
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
            ["capture/_capture.c"],
            depends=[RECORDS_H],
            optional=True,  # without it the capture thread and bulk readers run Python
            libraries=["crypto"],
            extra_compile_args=["-O2"],
        ),
        Extension(
            "msgcap.capture._v2",
            ["capture/_v2.c"],
            optional=True,  # without it BIP324 under decrypt runs capture/bip324.py's Python
            libraries=["crypto"],
            extra_compile_args=["-O2"],
        ),
    ]
)
