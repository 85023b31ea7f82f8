"""The layers point one way, and the source tree says what Python imports.

msgcap is four floors: ``capture`` (framing, BIP324, Core's capture format), ``parser``
(typed messages, JSON, datasets) on capture, ``proxy`` (the asyncio proxy and replayer) on
both, and the app package ``msgcap`` (command line, pytest plugin, public API) on top.
A floor imports only the floors below it; capture and parser are free of asyncio.

Checked twice, so neither check can be fooled alone: statically, every import statement
and every string that names a msgcap module (what ``importlib.import_module`` or
``native.load`` would be given) in every source file; and at run time, what importing all
of a floor's modules puts in ``sys.modules``.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parent.parent

FLOORS = ("capture", "parser", "proxy", "app")
"""Bottom to top."""

FOLDERS = {"capture": ROOT / "capture", "parser": ROOT / "parser", "proxy": ROOT / "proxy",
           "app": ROOT / "msgcap"}  # fmt: skip

NO_ASYNCIO = ("capture", "parser")

MAX_LINES = 700
COHESIVE = "one cohesive protocol"
"""What a longer module's docstring says (with why) to be allowed its length."""

_MODULE_NAME = re.compile(r"msgcap(\.\w+)+")
MSGCAP_NAMES = frozenset(
    {"capture", "parser", "proxy"} | {p.stem for p in (ROOT / "msgcap").glob("*.py")}
)
"""What may follow ``msgcap.`` in a module name (a metadata key like ``msgcap.table`` is no
module)."""


def floor_of(module: str) -> str | None:
    """The floor of a msgcap module name (None: not msgcap's)."""
    parts = module.split(".")
    if parts[0] != "msgcap":
        return None
    if len(parts) > 1 and parts[1] in ("capture", "parser", "proxy"):
        return parts[1]
    return "app"


def module_name(path: Path) -> str:
    floor = next(f for f, folder in FOLDERS.items() if path.is_relative_to(folder))
    rel = path.relative_to(FOLDERS[floor]).with_suffix("")
    parts = ["msgcap"] if floor == "app" else ["msgcap", floor]
    parts += [p for p in rel.parts if p != "__init__"]
    return ".".join(parts)


def sources() -> list[Path]:
    """Every Python file of the four floors, once (the links under msgcap/ are skipped)."""
    out = []
    for floor, folder in FOLDERS.items():
        for path in sorted(folder.rglob("*.py")):
            if floor == "app" and path.relative_to(folder).parts[0] in ("capture", "parser",
                                                                         "proxy"):  # fmt: skip
                continue
            out.append(path)
    return out


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the string constants that are docstrings (of modules, classes, functions,
    and the attribute docstrings that follow assignments)."""
    ids = set()
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if not isinstance(body, list):
            continue
        for stmt in body:
            if isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant):
                ids.add(id(stmt.value))
    return ids


def imports_of(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module name) for each module ``source`` imports (and each name it imports
    from one), or msgcap module it names as a string."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[int, str]] = []
    docstrings = _docstrings(tree)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((node.lineno, name))
            found += [(node.lineno, f"{name}.{a.name}") for a in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            if (
                id(node) not in docstrings
                and _MODULE_NAME.fullmatch(node.value)
                and node.value.split(".")[1] in MSGCAP_NAMES
            ):
                found.append((node.lineno, node.value))
    return found


def modules_imported(source: str, module: str, is_package: bool) -> list[tuple[int, str]]:
    """(line, module) for each ``import M`` and ``from M import ...`` of ``source``."""
    package = module if is_package else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
            name = ".".join([*base, node.module or ""]) if node.level else node.module or ""
            found.append((node.lineno, name.rstrip(".")))
    return found


def resolves(module: str) -> bool:
    """Whether ``module`` (a msgcap module) is a file of the tree: Python, or a native
    module's stub (``.pyi``: it may not be built here)."""
    floor = floor_of(module)
    parts = module.split(".")[1:] if floor == "app" else module.split(".")[2:]
    base = FOLDERS[floor or "app"].joinpath(*parts)
    return any(p.exists() for p in (base.with_suffix(".py"), base.with_suffix(".pyi"),
                                     base / "__init__.py"))  # fmt: skip


def violations(path: Path, source: str | None = None) -> list[str]:
    module = module_name(path)
    floor = floor_of(module)
    assert floor is not None
    text = path.read_text() if source is None else source
    out = []
    for line, name in imports_of(text, module, path.name == "__init__.py"):
        target = floor_of(name)
        where = f"{path.relative_to(ROOT)}:{line}"
        if target is not None and FLOORS.index(target) > FLOORS.index(floor):
            out.append(f"{where}: {floor} reaches up to {name} ({target})")
        if floor in NO_ASYNCIO and name.split(".")[0] in ("asyncio", "uvloop"):
            out.append(f"{where}: {floor} imports {name}")
    for line, name in modules_imported(text, module, path.name == "__init__.py"):
        if floor_of(name) is not None and name != "msgcap" and not resolves(name):
            out.append(f"{path.relative_to(ROOT)}:{line}: imports {name}, which does not exist")
    return out


def test_no_floor_imports_a_floor_above_it() -> None:
    problems = [v for path in sources() for v in violations(path)]
    assert not problems, "\n".join(problems)
    assert len(sources()) > 40  # the walk found the tree


@pytest.mark.parametrize(
    ("floor", "source", "caught"),
    [
        ("capture", "from msgcap.parser import wire\n", "reaches up to msgcap.parser"),
        ("capture", "import importlib\nimportlib.import_module('msgcap.proxy.server')\n",
         "reaches up to msgcap.proxy.server"),
        ("capture", "NAME = 'msgcap.parser._fastjson'\n", "reaches up"),
        ("parser", "from ..proxy import relay\n", "reaches up to msgcap.proxy"),
        ("parser", "from msgcap import cli\n", "reaches up to msgcap.cli"),
        ("parser", "import asyncio\n", "imports asyncio"),
        ("proxy", "from msgcap.testing import replay\n", "reaches up to msgcap.testing"),
        ("proxy", "from msgcap.capture._v2 import Pipe\n", "msgcap.capture._v2, which does not"),
        ("proxy", "from ..capture.gone import x\n", "msgcap.capture.gone, which does not"),
    ],
)  # fmt: skip
def test_the_check_catches_what_it_is_for(floor: str, source: str, caught: str) -> None:
    path = FOLDERS[floor] / "planted.py"
    assert any(caught in v for v in violations(path, source)), violations(path, source)


def test_a_docstring_naming_a_module_is_no_import() -> None:
    source = '"""See msgcap.proxy.server."""\n\ndef f() -> None:\n    """msgcap.cli"""\n'
    assert violations(FOLDERS["capture"] / "planted.py", source) == []


def python(code: str) -> str:
    """What a fresh interpreter running ``code`` prints (it must succeed)."""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=False)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    return res.stdout


def _loaded_after_importing(floor: str) -> set[str]:
    package = "msgcap" if floor == "app" else f"msgcap.{floor}"
    code = (
        "import importlib, pkgutil, sys\n"
        f"pkg = importlib.import_module({package!r})\n"
        "names = [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + '.')]\n"
        "for name in names:\n"
        "    importlib.import_module(name)\n"
        "print('\\n'.join(sorted(sys.modules)))\n"
    )
    return set(python(code).split())


@pytest.mark.parametrize("floor", ["capture", "parser", "proxy"])
def test_importing_a_floor_loads_nothing_above_it(floor: str) -> None:
    loaded = _loaded_after_importing(floor)
    mine = {m for m in loaded if floor_of(m) is not None and m != "msgcap"}
    assert any(floor_of(m) == floor for m in mine)
    above = sorted(m for m in mine if FLOORS.index(floor_of(m) or "app") > FLOORS.index(floor))
    assert not above, above
    if floor in NO_ASYNCIO:
        assert "asyncio" not in loaded and "uvloop" not in loaded


def test_no_module_is_several_modules() -> None:
    """No file of the three floors is over MAX_LINES lines unless its docstring says it is
    one cohesive protocol, and why."""
    long = []
    for path in sources():
        if path.is_relative_to(FOLDERS["app"]):
            continue
        text = path.read_text()
        lines = text.count("\n")
        doc = ast.get_docstring(ast.parse(text)) or ""
        if lines > MAX_LINES and COHESIVE not in " ".join(doc.split()):
            long.append(f"{path.relative_to(ROOT)}: {lines} lines")
    assert not long, long


# --- the layout ------------------------------------------------------------------------


def test_each_file_has_one_path_as_python_sees_it() -> None:
    """The owner's top-level folders are the packages ``msgcap.capture``, ``msgcap.parser``
    and ``msgcap.proxy``: pip installs them there (pyproject.toml's package-dir), and the
    links ``msgcap/{capture,parser,proxy}`` show the same tree to tools that read the source
    by import name (mypy, pytest, editors). Each link points at its folder, nothing else
    lives under msgcap/ by those names, and every module Python loads is a file of the
    top-level folder (one file, not a copy)."""
    for name in ("capture", "parser", "proxy"):
        link = ROOT / "msgcap" / name
        assert link.is_symlink() and link.readlink() == Path("..") / name
        assert link.resolve() == (ROOT / name).resolve()
    code = (
        "import importlib, pkgutil, sys\n"
        "for p in ('msgcap.capture', 'msgcap.parser', 'msgcap.proxy'):\n"
        "    pkg = importlib.import_module(p)\n"
        "    print(p, pkg.__file__)\n"
        "    for m in pkgutil.walk_packages(pkg.__path__, p + '.'):\n"
        "        print(m.name, importlib.import_module(m.name).__file__)\n"
    )
    rows = [line.split(" ", 1) for line in python(code).splitlines()]
    assert len(rows) > 30
    for floor in ("capture", "parser", "proxy"):
        loaded = {
            Path(file).resolve()
            for name, file in rows
            if name.split(".")[1] == floor and file.endswith(".py")
        }
        assert all(p.parent.is_relative_to((ROOT / floor).resolve()) for p in loaded), loaded
        on_disk = {p.resolve() for p in (ROOT / floor).rglob("*.py")}
        assert loaded == on_disk  # every file is the one module Python loads it as
