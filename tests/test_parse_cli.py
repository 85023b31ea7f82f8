"""``msgcap parse`` and ``msgcap stats`` against Core's own parser output and bad files."""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from msgcap.capture.conversation import CaptureFile, merged_batches
from msgcap.capture.framing import MsgType
from msgcap.capture.records import Record, RecordFilter, encode_record, read_records
from msgcap.cli import main
from msgcap.parser.render import BatchRenderer, render
from tests.conftest import PAIR, PAIR_A, PAIR_B
from tests.core_reference import parse_files
from tests.oracle import correct_message
from tests.vectors import VECTORS

FOLDERS = [PAIR_A, PAIR_B]


def run(tmp_path: Path, *args: str) -> tuple[int, Any, str]:
    """Run msgcap in-process with -o; return (status, parsed output, stderr)."""
    out = tmp_path / "out.json"
    err = tmp_path / "err.txt"
    old = sys.stderr
    with open(err, "w") as e:
        sys.stderr = e
        try:
            status = main([*args, "-o", str(out)])
        finally:
            sys.stderr = old
    text = out.read_text() if out.exists() else ""
    parsed: Any
    if "--jsonl" in args:
        parsed = [json.loads(line) for line in text.splitlines()]
    else:
        parsed = json.loads(text) if text else None
    return status, parsed, err.read_text()


def payloads_by_time(folder: Path) -> dict[tuple[str, int], bytes]:
    out = {}
    for name, direction in (("msgs_recv.dat", "recv"), ("msgs_sent.dat", "sent")):
        with open(folder / name, "rb") as f:
            for r in read_records(f):
                assert isinstance(r, Record)
                out[(direction, r.time)] = r.payload
    return out


def corrected_reference(ref_path: Path, folder: Path) -> list[dict[str, Any]]:
    payloads = payloads_by_time(folder)
    return [
        correct_message(m, payloads[(m["direction"], m["time"])])
        for m in json.loads(ref_path.read_text())
    ]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.parent.name)
def test_oracle_reimplementation_reproduces_core_output(folder: Path) -> None:
    """Our copy of Core's parser loop gives exactly the JSON Core's parser gave."""
    files = [str(folder / "msgs_recv.dat"), str(folder / "msgs_sent.dat")]
    assert json.loads(parse_files(files)) == json.loads(
        (folder.parent / f"{folder.name}.json").read_text()
    )
    for f in files:
        assert json.loads(parse_files([f])) == json.loads(Path(f[:-4] + ".json").read_text())


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.parent.name)
def test_folder_matches_core_parser(tmp_path: Path, folder: Path) -> None:
    status, ours, err = run(tmp_path, "parse", str(folder))
    assert status == 0, err
    expected = corrected_reference(folder.parent / f"{folder.name}.json", folder)
    assert ours == expected
    # The only differences from Core's literal output are the documented ones.
    literal = json.loads((folder.parent / f"{folder.name}.json").read_text())
    differing = {m["msgtype"] for m, r in zip(ours, literal, strict=True) if m != r}
    assert differing <= {"getheaders", "getblocks", "filteradd"}


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda p: p.parent.name)
@pytest.mark.parametrize("name", ["msgs_recv", "msgs_sent"])
def test_single_files_match_core_parser(tmp_path: Path, folder: Path, name: str) -> None:
    status, ours, _ = run(tmp_path, "parse", str(folder / f"{name}.dat"))
    assert status == 0
    assert ours == corrected_reference(folder / f"{name}.json", folder)


def test_parent_folder_and_explicit_files_agree(tmp_path: Path) -> None:
    folder = FOLDERS[0]
    _, by_parent, _ = run(tmp_path, "parse", str(folder.parent))
    _, by_files, _ = run(
        tmp_path, "parse", str(folder / "msgs_recv.dat"), str(folder / "msgs_sent.dat")
    )
    assert by_parent == by_files and len(by_parent) == 145


def test_jsonl_equals_array(tmp_path: Path) -> None:
    _, array, _ = run(tmp_path, "parse", str(FOLDERS[1]))
    _, lines, _ = run(tmp_path, "parse", "--jsonl", str(FOLDERS[1]))
    assert lines == array


def test_filters(tmp_path: Path) -> None:
    folder = FOLDERS[0]
    _, everything, _ = run(tmp_path, "parse", str(folder))
    _, blocks, _ = run(tmp_path, "parse", "--type", "block,inv", str(folder))
    assert blocks == [m for m in everything if m["msgtype"] in ("block", "inv")]
    _, recv, _ = run(tmp_path, "parse", "--direction", "recv", str(folder))
    assert recv == [m for m in everything if m["direction"] == "recv"]
    t0, t1 = everything[10]["time"], everything[20]["time"]
    _, window, _ = run(tmp_path, "parse", "--since", str(t0), "--until", str(t1), str(folder))
    assert window == everything[10:21]
    _, none, _ = run(tmp_path, "parse", "--peer", "10.*", str(folder))
    assert none == []
    _, peer, _ = run(tmp_path, "parse", "--peer", "127.0.0.1_*", "--with-peer", str(folder))
    assert [m.pop("peer") for m in peer] == ["127.0.0.1_39912"] * len(everything)
    assert peer == everything


def test_iso_time_filter(tmp_path: Path) -> None:
    _, everything, _ = run(tmp_path, "parse", str(FOLDERS[0]))
    status, late, _ = run(tmp_path, "parse", "--since", "2100-01-01T00:00:00Z", str(FOLDERS[0]))
    assert status == 0 and late == [] and everything


def test_display_hashes(tmp_path: Path) -> None:
    _, wire, _ = run(tmp_path, "parse", "--type", "inv", str(FOLDERS[0]))
    _, shown, _ = run(tmp_path, "parse", "--type", "inv", "--display-hashes", str(FOLDERS[0]))
    h = wire[0]["body"]["inv"][0]["hash"]
    assert shown[0]["body"]["inv"][0]["hash"] == bytes.fromhex(h)[::-1].hex()


def test_merging_two_peers_keeps_peer_names(tmp_path: Path) -> None:
    _, merged, _ = run(tmp_path, "parse", "--with-peer", str(PAIR))
    assert len(merged) == 290
    assert {m["peer"] for m in merged} == {"127.0.0.1_39912", "127.0.0.1_28444"}
    times = [m["time"] for m in merged]
    assert times == sorted(times)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


PING_PAYLOAD = bytes.fromhex(VECTORS["ping"])


def test_bad_files_warn_with_offsets_and_keep_the_rest(tmp_path: Path) -> None:
    good = encode_record(1, "ping", PING_PAYLOAD) + encode_record(2, "verack", b"")
    peer = tmp_path / "cap" / "10.0.0.1_8333"
    write(peer / "msgs_recv.dat", good + encode_record(3, "pong", PING_PAYLOAD)[:-3])
    write(peer / "msgs_sent.dat", b"")
    other = tmp_path / "cap" / "10.0.0.2_8333"
    garbage = (9).to_bytes(8, "little") + b"x" * 12 + (10**9).to_bytes(4, "little") + b"zz"
    write(other / "msgs_sent.dat", good + garbage)
    weird = tmp_path / "cap" / "10.0.0.3_8333"
    write(
        weird / "msgs_recv.dat",
        encode_record(4, MsgType.of(b"\x01bad"), b"ab")
        + encode_record(5, MsgType.of(b"\xc3\x28"), b"")
        + encode_record(6, "ping", b"\x01\x02\x03")
        + encode_record(7, "newthing", b"\x00"),
    )
    status, out, err = run(tmp_path, "parse", "--with-peer", str(tmp_path / "cap"))
    assert status == 1
    assert f"{peer / 'msgs_recv.dat'}: offset {len(good)}: truncated record" in err
    assert f"{other / 'msgs_sent.dat'}: offset {len(good)}: implausible payload length" in err
    assert "unreadable message type" in err and "need 8 bytes" in err
    summary = [(m["peer"], m["time"], m["msgtype"], m.get("error")) for m in out]
    assert summary == [
        ("10.0.0.1_8333", 1, "ping", None),
        ("10.0.0.2_8333", 1, "ping", None),
        ("10.0.0.1_8333", 2, "verack", None),
        ("10.0.0.2_8333", 2, "verack", None),
        ("10.0.0.3_8333", 4, "UNREADABLE", "Unrecognized message type."),
        ("10.0.0.3_8333", 5, "UNREADABLE", "Unrecognized message type."),
        ("10.0.0.3_8333", 6, "ping", "Unable to deserialize message."),
        ("10.0.0.3_8333", 7, "newthing", "Unrecognized message type."),
    ]
    assert out[6]["body"] == "010203" and out[7]["body"] == "00"


def test_unknown_types_alone_exit_zero(tmp_path: Path) -> None:
    f = write(tmp_path / "p" / "msgs_recv.dat", encode_record(1, "newthing", b""))
    status, out, err = run(tmp_path, "parse", str(f))
    assert status == 0
    assert out == [
        {
            "direction": "recv",
            "time": 1,
            "size": 0,
            "msgtype": "newthing",
            "body": "",
            "error": "Unrecognized message type.",
        }
    ]
    assert "unrecognized message type 'newthing'" in err


def test_unsorted_file_is_ordered_like_core(tmp_path: Path) -> None:
    data = b"".join(
        encode_record(t, "ping", t.to_bytes(8, "little")) for t in (5, 3, 9, 3, 1, 7, 5)
    )
    recv = write(tmp_path / "p" / "msgs_recv.dat", data)
    sent = write(tmp_path / "p" / "msgs_sent.dat", encode_record(3, "verack", b""))
    status, ours, _ = run(tmp_path, "parse", str(recv), str(sent))
    assert status == 0
    assert ours == json.loads(parse_files([str(recv), str(sent)]))


def test_missing_path_is_usage_error(tmp_path: Path) -> None:
    status, _, err = run(tmp_path, "parse", str(tmp_path / "nope.dat"))
    assert status == 2 and "no such file" in err


def test_stats_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["stats", str(FOLDERS[0])]) == 0
    text = capsys.readouterr().out
    rows = [line.split() for line in text.splitlines()]
    cmpct = next(r for r in rows if r[1:3] == ["sent", "cmpctblock"])
    literal = json.loads((PAIR / "a" / "127.0.0.1_39912.json").read_text())
    sent_cmpct = [m for m in literal if m["direction"] == "sent" and m["msgtype"] == "cmpctblock"]
    assert cmpct[0] == "127.0.0.1_39912"
    assert int(cmpct[3]) == len(sent_cmpct)
    assert int(cmpct[4]) == sum(m["size"] for m in sent_cmpct)
    total = next(r for r in rows if r[0] == "(all)")
    assert int(total[1]) == 145


def test_console_script_prints_to_stdout() -> None:
    exe = shutil.which("msgcap") or ""
    cmd = [exe] if exe else [sys.executable, "-m", "msgcap"]
    res = subprocess.run(
        [*cmd, "parse", str(FOLDERS[0] / "msgs_recv.dat")], capture_output=True, check=False
    )
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout) == corrected_reference(FOLDERS[0] / "msgs_recv.json", FOLDERS[0])


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    chunks=st.lists(
        st.one_of(
            st.binary(max_size=80),
            st.builds(
                encode_record,
                st.integers(0, 2**64 - 1),
                st.sampled_from(sorted(VECTORS)),
                st.binary(max_size=120),
            ),
        ),
        max_size=8,
    )
)
def test_arbitrary_files_never_crash(tmp_path: Path, chunks: list[bytes]) -> None:
    f = write(tmp_path / "fz" / "msgs_recv.dat", b"".join(chunks))
    status, out, _ = run(tmp_path, "parse", str(f))
    assert status in (0, 1)
    assert isinstance(out, list)


def test_progress_bar_draws_to_the_terminal() -> None:
    import io

    from msgcap.parser.cli import Progress

    out = io.StringIO()
    bar = Progress(1000, out)
    bar.advance(500)
    bar.finish()
    text = out.getvalue()
    assert " 50%" in text and "100%" in text and text.endswith("\n")
    assert text.count("\r") == 2


@pytest.mark.parametrize("hard", [80, 4096])
def test_many_files_and_the_open_file_limit(tmp_path: Path, hard: int) -> None:
    import resource

    for i in range(100):
        write(tmp_path / "cap" / f"10.0.{i // 250}.{i % 250}_8333" / "msgs_recv.dat",
              encode_record(i, "ping", PING_PAYLOAD))  # fmt: skip

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (60, hard))

    res = subprocess.run(
        [sys.executable, "-m", "msgcap", "parse", "--jsonl", str(tmp_path / "cap")],
        capture_output=True, text=True, preexec_fn=limit, check=False,
    )  # fmt: skip
    if hard < 164:
        assert res.returncode == 2 and "limit on open files is" in res.stderr
    else:
        assert res.returncode == 0, res.stderr
        assert [json.loads(x)["time"] for x in res.stdout.splitlines()] == list(range(100))


def test_node_folders_are_named(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A capture root with one folder per node: --with-peer and stats name the node."""
    from msgcap.capture.records import encode_record

    for node in ("n1", "n2"):
        folder = tmp_path / node / "127.0.0.1_18444"
        folder.mkdir(parents=True)
        (folder / "msgs_recv.dat").write_bytes(encode_record(1, "verack", b""))
    assert main(["parse", "--jsonl", "--with-peer", str(tmp_path)]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted((m["node"], m["peer"]) for m in lines) == [
        ("n1", "127.0.0.1_18444"), ("n2", "127.0.0.1_18444")]  # fmt: skip
    assert main(["stats", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "n1/127.0.0.1_18444" in out and "n2/127.0.0.1_18444" in out


# --- batches: the native path gives what record-by-record rendering gives ---------------

_NAMES = sorted(VECTORS)


def _payload_for(name: str) -> st.SearchStrategy[bytes]:
    vector = bytes.fromhex(VECTORS.get(name, ""))
    mutated = st.builds(
        lambda at, value, cut: (vector[:at] + bytes([value]) + vector[at + 1 :])[:cut],
        st.integers(0, max(len(vector) - 1, 0)),
        st.integers(0, 255),
        st.integers(0, len(vector) + 1),
    )
    return st.one_of(st.just(vector), mutated, st.binary(max_size=40))


record_specs = st.tuples(
    st.integers(0, 30) | st.integers(0, 2**64 - 1),
    st.one_of(
        st.sampled_from(_NAMES).flatmap(lambda n: st.tuples(st.just(MsgType.from_text(n)),
                                                           _payload_for(n))),
        st.tuples(
            st.sampled_from([b"newthing", b"\x01bad", b"\xc3\x28", b"ping\0junk", b""]).map(
                MsgType.of
            ),
            st.binary(max_size=20),
        ),
    ),
).map(lambda s: encode_record(s[0], s[1][0], s[1][1]))  # fmt: skip


def reference_render(
    files: list[CaptureFile], selection: RecordFilter, jsonl: bool, reverse: bool, peer: bool
) -> tuple[bytes, list[tuple[str, int, str]]]:
    """Core's order (a stable sort by time over the files in order), each record through
    render() and orjson as the parser did before batches, and the problems met."""
    recs = []
    for source in files:
        with open(source.path, "rb") as f:
            recs += [(r, source) for r in read_records(f) if isinstance(r, Record)]
    recs.sort(key=lambda e: e[0].time)
    texts, problems = [], []
    for rec, source in recs:
        if not selection.accepts(rec.time, rec.raw_msgtype):
            continue
        obj, problem = render(rec, source.direction, reverse)
        if problem is not None:
            problems.append((source.peer, rec.offset, problem.detail))
        if peer:
            if source.node is not None:
                obj["node"] = source.node
            obj["peer"] = source.peer
        texts.append(orjson.dumps(obj))
    if jsonl:
        return b"".join(t + b"\n" for t in texts), problems
    return b",".join(texts), problems


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    contents=st.lists(
        st.tuples(st.lists(record_specs, max_size=8), st.binary(max_size=30) | st.just(b"")),
        min_size=1,
        max_size=3,
    ),
    jsonl=st.booleans(),
    reverse=st.booleans(),
    peer=st.booleans(),
    since=st.none() | st.integers(0, 30),
    until=st.none() | st.integers(0, 30),
    types=st.none() | st.sets(st.sampled_from([b"ping", b"tx", b"newthing", b"\x01bad"])),
    chunk_size=st.sampled_from([1, 300, 1 << 20]),
)
def test_batches_render_like_records(
    tmp_path: Path,
    contents: list[tuple[list[bytes], bytes]],
    jsonl: bool,
    reverse: bool,
    peer: bool,
    since: int | None,
    until: int | None,
    types: set[bytes] | None,
    chunk_size: int,
) -> None:
    files = []
    for i, (records, tail) in enumerate(contents):
        name = "msgs_recv.dat" if i % 2 == 0 else "msgs_sent.dat"
        path = write(tmp_path / "cap" / f"10.0.0.{i // 2}_8333" / name, b"".join(records) + tail)
        files.append(CaptureFile.at(path, tmp_path))
    selection = RecordFilter(since, until, None if types is None else frozenset(types))
    problems: list[tuple[str, int, str]] = []
    out = io.BytesIO()
    renderer = BatchRenderer(
        out,
        jsonl=jsonl,
        display_hashes=reverse,
        with_peer=peer,
        selection=selection,
        on_problem=lambda item, p: problems.append(
            (item.source.peer, item.record.offset, p.detail)
        ),
        chunk_size=chunk_size,
    )
    for batch in merged_batches(files, lambda source, damage: None):
        renderer.render(batch)
    renderer.flush()
    assert (out.getvalue(), problems) == reference_render(files, selection, jsonl, reverse, peer)


def test_pure_python_gives_the_same_bytes(tmp_path: Path) -> None:
    """Without the native code (MSGCAP_PURE_PYTHON=1) parse writes the same bytes."""
    outputs = []
    for pure in ("", "1"):
        res = subprocess.run(
            [sys.executable, "-m", "msgcap", "parse", "--with-peer", str(PAIR)],
            capture_output=True, check=True, env={**os.environ, "MSGCAP_PURE_PYTHON": pure},
        )  # fmt: skip
        outputs.append(res.stdout)
    assert outputs[0] == outputs[1] and len(json.loads(outputs[0])) == 290


def test_interleaved_files_merge_in_time_order(tmp_path: Path) -> None:
    """Files whose records alternate one by one (a run per record), ties to the file
    given first, across chunk boundaries."""
    n = 3000
    recv = b"".join(encode_record(2 * i, "ping", i.to_bytes(8, "little")) for i in range(n))
    sent = b"".join(encode_record(2 * i + (i % 2), "pong", i.to_bytes(8, "little"))
                    for i in range(n))  # fmt: skip
    folder = tmp_path / "p"
    write(folder / "msgs_recv.dat", recv)
    write(folder / "msgs_sent.dat", sent)
    status, ours, _ = run(tmp_path, "parse", str(folder))
    assert status == 0
    files = [str(folder / "msgs_recv.dat"), str(folder / "msgs_sent.dat")]
    assert ours == json.loads(parse_files(files))
    status, lines, _ = run(tmp_path, "parse", "--jsonl", "--type", "pong", str(folder))
    assert [m["time"] for m in lines] == [2 * i + (i % 2) for i in range(n)]


def test_stats_with_filters_count_what_parse_prints(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    folder = FOLDERS[0]
    _, everything, _ = run(tmp_path, "parse", "--since", "0", str(folder))
    t0 = everything[40]["time"]
    _, window, _ = run(tmp_path, "parse", "--since", str(t0), "--type", "cmpctblock,inv",
                       str(folder))  # fmt: skip
    assert main(["stats", "--since", str(t0), "--type", "cmpctblock,inv", str(folder)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    total = next(r for r in rows if r[0] == "(all)")
    assert int(total[1]) == len(window) and int(total[2]) == sum(m["size"] for m in window)
