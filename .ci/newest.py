"""Fail unless every dependency pyproject.toml declares is installed at its newest release.

Run with the venv's Python right after the README's install. For each requirement of
``[project] dependencies`` and of every extra whose marker applies here, "newest" is what
pip itself would install for that requirement alone on this interpreter and platform:
``pip install --dry-run --ignore-installed --no-deps --report`` with the declared
specifiers, so yanked releases, releases with no wheel or sdist for this Python, and
pre-releases (unless the declared range names one, as pip decides) are left out, just as
in a fresh install. A declared dependency that is missing, or older than that (something
holds it back, such as another package's cap), fails the run: a range's newest end must
be the one tested, and a new release that breaks us should turn CI red.

Usage: .venv/bin/python .ci/newest.py [pyproject.toml]  (needs ``packaging``)
"""

from __future__ import annotations

import json
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def declared(pyproject: dict[str, object]) -> list[Requirement]:
    """The requirements of the core dependencies and every extra that apply here."""
    project = pyproject["project"]
    assert isinstance(project, dict)
    extras: dict[str, list[str]] = project.get("optional-dependencies", {})
    texts = [*project.get("dependencies", []), *(r for reqs in extras.values() for r in reqs)]
    reqs = [Requirement(text) for text in dict.fromkeys(texts)]
    return [req for req in reqs if req.marker is None or req.marker.evaluate()]


def newest(reqs: list[Requirement]) -> dict[str, str]:
    """What pip would install for each requirement alone: canonical name -> version."""
    cmd = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed",
           "--no-deps", "--quiet", "--report", "-", *map(str, reqs)]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    report = json.loads(res.stdout)
    return {
        canonicalize_name(item["metadata"]["name"]): item["metadata"]["version"]
        for item in report["install"]
    }


def installed(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def main() -> int:
    path = Path(sys.argv[1] if len(sys.argv) > 1 else "pyproject.toml")
    reqs = declared(tomllib.loads(path.read_text()))
    offered = newest(reqs)
    stale = []
    for name in sorted({canonicalize_name(req.name) for req in reqs}):
        have, best = installed(name), offered.get(name)
        ok = have is not None and best is not None and Version(have) == Version(best)
        label = "ok" if ok else "MISSING" if have is None else "NOT NEWEST"
        print(f"{label:>10}  {name:<20} installed {have}, newest {best}")
        if not ok:
            stale.append(name)
    if stale:
        print(
            f"\nFAIL: not installed at the newest release pip offers here: {', '.join(stale)}.\n"
            "CI must test the newest end of each declared range (a missing one belongs in the\n"
            "test extra); pip says what holds one back with:\n"
            "  .venv/bin/pip install --dry-run NAME==NEWEST -e '.[fast,test]'",
            file=sys.stderr,
        )
        return 1
    print(f"All {len(offered)} declared dependencies are at the newest release pip offers.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
