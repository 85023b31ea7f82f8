"""Config loading, validation and flag overrides."""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

import pytest

from msgcap.capture.errors import ConfigError
from msgcap.capture.layout import Layout
from msgcap.cli import add_proxy_args, build_parser, main, proxy_config
from msgcap.proxy.config import (
    DEFAULT_CONFIG,
    CaptureErrorPolicy,
    HostPort,
    V2Policy,
    config_from_dict,
    load_toml,
)

ROOT = Path(__file__).parent.parent


def test_example_config_is_the_default_with_every_key() -> None:
    example = config_from_dict(load_toml(ROOT / "config.example.toml"))
    default = config_from_dict(DEFAULT_CONFIG)
    assert example == default
    assert example.routes[0].peer == HostPort("127.0.0.1", 18444)
    assert [s.listen for s in example.socks5] == [HostPort("127.0.0.1", 9050)]


def test_every_config_key_has_a_flag() -> None:
    text = (ROOT / "config.example.toml").read_text()
    keys = {m.group(1) for m in re.finditer(r"^#? ?([a-z_0-9]+) = ", text, re.MULTILINE)}
    assert {"network", "magic", "idle_timeout", "allow"} <= keys
    # --route LISTEN=PEER[@NODE_NAME], --inbound LISTEN=NODE[@NODE_NAME], --socks5 LISTEN[@..]
    keys -= {"listen", "peer", "node", "node_name"}
    parser = argparse.ArgumentParser()
    add_proxy_args(parser)
    help_text = parser.format_help()
    for key in keys:
        flag = {"username": "socks5-username", "password": "socks5-password",
                "allow": "socks5-allow", "mark": "transparent-mark",
                }.get(key, key.replace("_", "-"))  # fmt: skip
        assert f"--{flag}" in help_text, key


def args(*argv: str) -> Any:
    return build_parser().parse_args(["proxy", *argv])


def test_flags_override_file(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        'network = "main"\nlayout = "core"\n'
        '[[route]]\nlisten = "127.0.0.1:1"\npeer = "1.2.3.4:8333"\n'
    )
    cfg = proxy_config(args("--config", str(f), "--layout", "session", "--v2", "passthrough",
                            "--inbound", "127.0.0.1:2=127.0.0.1:8333", "--idle-timeout", "5",
                            "--on-capture-error", "stop"))  # fmt: skip
    assert cfg.network == "main" and cfg.magic == bytes.fromhex("f9beb4d9")
    assert cfg.layout is Layout.SESSION and cfg.v2 is V2Policy.PASSTHROUGH
    assert cfg.on_capture_error is CaptureErrorPolicy.STOP
    assert [r.kind for r in cfg.routes] == ["inbound"]
    assert cfg.limits.idle_timeout == 5
    assert cfg.socks5 == ()


def test_named_nodes_in_file_and_flags(tmp_path: Path) -> None:
    f = tmp_path / "c.toml"
    f.write_text(
        '[[socks5]]\nlisten = "127.0.0.1:9050"\nnode_name = "n1"\n'
        '[[socks5]]\nlisten = "127.0.0.1:9051"\nnode_name = "n2"\n'
        '[[route]]\nlisten = "127.0.0.1:1"\npeer = "127.0.0.1:18444"\nnode_name = "n3"\n'
    )
    cfg = proxy_config(args("--config", str(f)))
    assert [(s.listen.port, s.node_name) for s in cfg.socks5] == [(9050, "n1"), (9051, "n2")]
    assert cfg.routes[0].node_name == "n3"
    single = config_from_dict({"socks5": {"listen": "127.0.0.1:9050"}})  # [socks5] still works
    assert [s.node_name for s in single.socks5] == [None]
    cfg = proxy_config(args("--socks5", "127.0.0.1:9060@a", "--socks5", "127.0.0.1:9061",
                            "--route", "127.0.0.1:2=127.0.0.1:18444@b"))  # fmt: skip
    assert [(s.listen.port, s.node_name) for s in cfg.socks5] == [(9060, "a"), (9061, None)]
    assert [(r.listen.port, r.node_name) for r in cfg.routes] == [(2, "b")]
    for bad in ("../x", "a/b", "", ".."):
        with pytest.raises(ConfigError, match="node_name"):
            config_from_dict({"socks5": {"listen": "127.0.0.1:1", "node_name": bad}})


def test_custom_magic() -> None:
    cfg = config_from_dict(
        {"magic": "01020304", "route": [{"listen": "127.0.0.1:1", "peer": "h:2"}]}
    )
    assert cfg.magic == b"\x01\x02\x03\x04"


@pytest.mark.parametrize(
    "data,message",
    [
        ({"network": "moon"}, "unknown network"),
        ({"bogus": 1}, "unknown key 'bogus'"),
        ({"route": [{"listen": "127.0.0.1:1"}]}, "exactly one of 'peer' or 'node'"),
        ({"route": [{"listen": "nope", "peer": "a:1"}]}, "is not HOST:PORT"),
        ({"route": [{"listen": "127.0.0.1:99999", "peer": "a:1"}]}, "out of range"),
        ({"layout": "flat"}, "is not one of"),
        ({}, "nothing to listen on"),
        ({"socks5": {"listen": "0.0.0.0:9050"}}, "open proxy"),
        ({"socks5": {"listen": "127.0.0.1:1", "username": "u"}}, "both"),
        ({"socks5": {"listen": "127.0.0.1:1"}, "limits": {"idle_timeout": -1}}, "negative"),
        ({"socks5": {"listen": "127.0.0.1:1"}, "limits": {"max_connections": "x"}}, "expected int"),
    ],
)
def test_config_errors(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        config_from_dict(data)


def test_public_socks_with_credentials_is_allowed() -> None:
    cfg = config_from_dict({"socks5": {"listen": "0.0.0.0:9050", "username": "u", "password": "p"}})
    assert cfg.socks5[0].username == "u"


def test_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    f = tmp_path / "bad.toml"
    f.write_text("network = [")
    assert main(["proxy", "--config", str(f)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("msgcap: error:") and err.count("\n") == 1
    assert main(["proxy", "--config", str(tmp_path / "missing.toml")]) == 2
