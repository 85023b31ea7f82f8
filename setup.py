"""Build the optional native JSON renderer; everything else is in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "parser._fastjson",
            ["parser/_fastjson.c"],
            optional=True,  # without a compiler, msgcap falls back to parser/fastjson.py
            extra_compile_args=["-O2"],
        )
    ]
)
