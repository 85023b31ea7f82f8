"""pytest fixtures for capturing live traffic and turning captures into regression tests
(entry point ``pytest11``): ``msgcap_proxy``, ``msgcap_capture`` and ``msgcap_replay``.

pytest loads this module in every project where msgcap is installed, so it imports
nothing of msgcap's until a test asks for one of its fixtures: the work is in
:mod:`msgcap.testing` (the same API, for use without pytest).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from msgcap.testing import CapturedMessage, ProxyFactory


@pytest.fixture
def msgcap_proxy(tmp_path: Path) -> Iterator[ProxyFactory]:
    """``msgcap_proxy({"route": [{"listen": "127.0.0.1:0", "peer": "127.0.0.1:18444"}]})``
    -> a started :class:`msgcap.testing.RunningProxy`.

    The keys are ``msgcap proxy``'s TOML keys (``config.example.toml``), given as a dict,
    as keyword arguments, or both; a key set to None is left out (``"socks5": None``: no
    SOCKS5 listener, which is also the default here). ``network`` defaults to regtest and
    ``capture_dir`` to a fresh folder under the test's ``tmp_path``; port 0 picks a free
    port. Every proxy started is stopped when the test ends.
    """
    from msgcap.testing import proxy_factory

    yield from proxy_factory(tmp_path)


@pytest.fixture
def msgcap_capture() -> Callable[..., list[CapturedMessage]]:
    """``msgcap_capture(path, ...)`` -> list of :class:`msgcap.testing.CapturedMessage`."""
    from msgcap.testing import load_capture

    return load_capture


@pytest.fixture
def msgcap_replay() -> Callable[..., Any]:
    """``msgcap_replay(path, to="127.0.0.1:18444")`` -> Report (``.diverged`` means
    substantive divergence; ``.substantive`` and ``.benign`` list what differs).
    ``msgcap_replay(path, to=["127.0.0.1:18444", "127.0.0.1:18445"])`` (or ``listen=``
    with ``connections=N``) -> DiffReport: how the nodes differ (see
    :func:`msgcap.testing.replay`)."""
    from msgcap.testing import replay

    return replay
