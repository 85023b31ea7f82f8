"""Build the optional native parts; everything else is in pyproject.toml.

All are optional: without a compiler (or, for the capture and BIP324 helpers, OpenSSL's
headers) msgcap uses its pure-Python code instead.
"""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "msgcap.parser._fastjson",
            ["parser/_fastjson.c"],
            optional=True,  # without a compiler, msgcap falls back to parser/fastjson.py
            extra_compile_args=["-O2"],
        ),
        Extension(
            "msgcap.capture._capture",
            ["capture/_capture.c"],
            optional=True,  # without it the capture thread checks and writes in Python
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
