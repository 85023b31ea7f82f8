"""``msgcap export --functional-test OUT.py CAPTURE``: a recorded connection becomes a test
for Bitcoin Core's functional test framework.

The test starts one fresh regtest node (clean chain), connects a ``P2PInterface`` that plays
the recorded peer (the capture's ``msgs_recv.dat`` side), and asserts what the recording
shows the node did: its handshake (version, services, relay, the messages before
``verack``), the requests it made that the recording answers, and the tip it reached.

The peer follows the conversation as ``msgcap replay`` does: recorded answers wait for the
matching live request (a block or transaction by its hash, headers from the chain after
the first known locator hash, up to 2000 and the stop hash, ``blocktxn`` from the block),
and everything else is sent unasked in recorded order. Unlike the replayer, the test sends
each unasked message only once the node has made the requests the recording shows it made
before that message (a test may wait; a replay does not).

Blocks the recorded node had of its own (it sent them and had not received them: it mined
them, or had them before) are given to the fresh node with ``submitblock`` where the node
first sent them. The node runs with ``-maxtipage`` large (recorded blocks may be old; a
node in initial block download ignores transaction announcements) and with the options
that give it the services the recorded node announced (``-v2transport=1`` for
NODE_P2P_V2, ``-peerbloomfilters`` for NODE_BLOOM, ``-blockfilterindex`` and
``-peerblockfilters`` for NODE_COMPACT_FILTERS, ``-blocksonly`` when it said relay=0).

Messages are written as constructors of the framework's message classes
(``msg_sendcmpct(...)``, ``msg_inv([CInv(...)])``, ``msg_headers(...)``); blocks,
transactions and headers go to a JSON data file beside the test (``OUT.json``); raw bytes
(``msg_generic``) only for types the framework has no class for. The file imports only
``test_framework`` and the standard library, so it runs unchanged in a Core source tree's
``test/functional/``.

:mod:`msgcap.parser.functional_plan` reads the recording into a :class:`Plan`; this
module renders the plan as the test and its data file. No asyncio here.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path

from msgcap.capture.conversation import DamageReport, warn_damage
from msgcap.capture.framing import hash256
from msgcap.parser import messages as m
from msgcap.parser.chain import try_decode
from msgcap.parser.functional_plan import Plan, plan
from msgcap.parser.structures import MSG_WITNESS_FLAG, InvType
from msgcap.parser.wire import display_hash

NODE_BLOOM = 1 << 2
NODE_COMPACT_FILTERS = 1 << 6
NODE_P2P_V2 = 1 << 11

INV_NAMES: dict[int, str] = {t: t.name for t in InvType if t and t < MSG_WITNESS_FLAG}
"""The framework's names for Core's inventory types (the witness flag is or-ed in)."""
EMPTY_CLASSES = {
    "sendheaders": "msg_sendheaders",
    "getaddr": "msg_getaddr",
    "mempool": "msg_mempool",
    "verack": "msg_verack",
    "wtxidrelay": "msg_wtxidrelay",
    "sendaddrv2": "msg_sendaddrv2",
    "filterclear": "msg_filterclear",
}


def _hex_int(h: bytes) -> str:
    """A wire-order hash as the framework's integer (``CInv.hash``), in hex."""
    return "0x" + display_hash(h)


# --- the test's text -----------------------------------------------------------------------


def constructor(msgtype: str, payload: bytes, plan: Plan) -> tuple[str, set[str]]:
    """A recorded message as Python that builds it with the framework's classes, and the
    names it needs imported."""
    msg = try_decode(msgtype, payload)
    if msgtype in EMPTY_CLASSES and not payload:
        name = EMPTY_CLASSES[msgtype]
        return f"{name}()", {name}
    if isinstance(msg, m.SendCmpct):
        return (f"msg_sendcmpct(announce={bool(msg.announce)}, version={msg.version})",
                {"msg_sendcmpct"})  # fmt: skip
    if isinstance(msg, m.FeeFilter):
        return f"msg_feefilter(feerate={msg.feerate})", {"msg_feefilter"}
    if isinstance(msg, m.Ping):
        return f"msg_ping(nonce={msg.nonce})", {"msg_ping"}
    if isinstance(msg, m.Inv | m.GetData | m.NotFound) and all(
        i.type in INV_NAMES or i.type & ~MSG_WITNESS_FLAG in INV_NAMES for i in msg.inv
    ):
        names = {"CInv"}
        items = []
        for i in msg.inv:
            base = INV_NAMES[i.type & ~MSG_WITNESS_FLAG]
            names.add(base)
            kind = base
            if i.type & MSG_WITNESS_FLAG:
                names.add("MSG_WITNESS_FLAG")
                kind = f"{base} | MSG_WITNESS_FLAG"
            items.append(f"CInv({kind}, {_hex_int(i.hash)})")
        cls = {"inv": "msg_inv", "getdata": "msg_getdata", "notfound": "msg_notfound"}[msgtype]
        return f"{cls}([{', '.join(items)}])", names | {cls}
    if isinstance(msg, m.GetHeaders | m.GetBlocks):
        locator_hashes = [_hex_int(h) for h in msg.locator.hashes]
        locator = ", ".join(locator_hashes)
        if len(locator_hashes) > 1:  # one hash a line
            locator = "\n" + "".join(f"            {h},\n" for h in locator_hashes) + "        "
        fn = "getheaders" if msgtype == "getheaders" else "getblocks"
        stop = _hex_int(msg.stop_hash) if any(msg.stop_hash) else "0"
        return f"{fn}([{locator}], stop={stop})", set()
    if isinstance(msg, m.Headers):
        hashes = ", ".join(f'"{display_hash(h.hash)}"' for h in msg.headers)
        return f"msg_headers(self.data.headers([{hashes}]))", {"msg_headers"}
    if msgtype in ("block", "cmpctblock"):
        block = display_hash(hash256(payload[:80]))
        if msgtype == "block" and block in plan.blocks:
            return f'msg_block(self.data.block("{block}"))', {"msg_block"}
        if msgtype == "cmpctblock" and block in plan.cmpctblocks:
            return f'self.data.cmpctblock("{block}")', set()
    if isinstance(msg, m.Tx) and display_hash(msg.tx.txid) in plan.txs:
        return f'msg_tx(self.data.tx("{display_hash(msg.tx.txid)}"))', {"msg_tx"}
    return f'msg_generic(b"{msgtype}", bytes.fromhex("{payload.hex()}"))', {"msg_generic"}


def _version_values(v: m.Version) -> str:
    return f"{v.version}, {v.services:#x}, {v.start_height}, {int(v.relay or 0)}"


def _extra_args(v: m.Version | None) -> list[str]:
    """Options that give a fresh node the services the recorded node announced."""
    args = ["-maxtipage=1000000000"]  # recorded blocks may be old: leave IBD anyway
    if v is None:
        return args
    if v.services & NODE_P2P_V2:
        args.append("-v2transport=1")
    if v.services & NODE_BLOOM:
        args.append("-peerbloomfilters=1")
    if v.services & NODE_COMPACT_FILTERS:
        args += ["-blockfilterindex=1", "-peerblockfilters=1"]
    if not v.relay:
        args.append("-blocksonly=1")
    return args


def _class_name(stem: str) -> str:
    words = [w for w in "".join(c if c.isalnum() else " " for c in stem).split() if w]
    name = "".join(w[:1].upper() + w[1:] for w in words) or "Recorded"
    return ("Test" + name if name[0].isdigit() else name) + "Test"


def render(plan: Plan, data_name: str, source: str, stem: str) -> str:
    """The test file's text."""
    imports = {"CInv", "msg_verack", "msg_wtxidrelay", "msg_sendaddrv2", "msg_headers",
               "msg_getheaders", "msg_getblocks", "msg_notfound", "msg_blocktxn",
               "msg_block", "msg_tx", "msg_cmpctblock", "msg_version", "from_hex", "CBlock",
               "CBlockHeader", "CTransaction", "BlockTransactions", "MSG_TX", "MSG_WTX",
               "MSG_WITNESS_FLAG"}  # fmt: skip
    lines: list[str] = []
    waited = shown = 0
    for n, height, msgtype, payload in plan.script:
        if n > waited:
            lines.append(f"        self.wait_for_requests(peer, {n})")
            waited = n
        if height > shown:
            lines.append(f"        peer.shown = {height}  # the recorded chain up to here")
            shown = height
        if msgtype == "submit":
            lines.append(f'        self.submit(node, peer, "{payload.decode()}")')
            continue
        text, names = constructor(msgtype, payload, plan)
        imports |= names
        lines.append(f"        peer.send_recorded({text})")
    script = "\n".join(lines) or "        pass  # the recorded peer sent nothing unasked"
    node = plan.node_version
    handshake = ""
    if node is not None:
        handshake = f"""
        # The node's handshake, as recorded.
        version = peer.node_version
        assert_equal(version.nVersion, {node.version})
        assert_equal(version.nServices, {node.services:#x})
        assert_equal(version.relay, {int(node.relay or 0)})
        assert_equal(peer.before_verack, {plan.node_features!r})
"""
    tip = ""
    if plan.tip is not None:
        tip = f"""
        # The tip the node reached in the recording.
        self.wait_until(lambda: node.getbestblockhash() == "{plan.tip}", timeout=60)
"""
    getheaders = ""
    if plan.getheaders:
        getheaders = f"""        assert peer.getheaders >= 1, "the recording shows {plan.getheaders} getheaders answered, the node sent none"
"""  # noqa: E501
    import_list = ",\n    ".join(sorted(imports, key=lambda s: (not s.isupper(), s.lower())))
    return TEMPLATE.format(
        source=source,
        data_name=data_name,
        imports=import_list,
        peer_version_values=_version_values(plan.peer_version),
        support_addrv2="sendaddrv2" in plan.peer_features,
        wtxidrelay="wtxidrelay" in plan.peer_features,
        feature_messages=", ".join(
            f"{EMPTY_CLASSES[f]}()" for f in plan.peer_features if f in EMPTY_CLASSES
        ),
        extra_args=_extra_args(node),
        handshake=handshake,
        script=script,
        expected=len(plan.expected),
        getheaders=getheaders,
        tip=tip,
        cls=_class_name(stem),
    )


def export_functional_test(
    paths: Iterable[str | os.PathLike[str]],
    out: str | os.PathLike[str],
    on_damage: DamageReport = warn_damage,
) -> tuple[Path, Path, Plan]:
    """Write the test to ``out`` and its data beside it (``out`` with ``.json``)."""
    paths = [os.fspath(p) for p in paths]
    the_plan = plan(paths, on_damage)
    out = Path(out)
    data = out.with_suffix(".json")
    source = ", ".join(Path(p).name for p in paths)
    content = {
        "source": source,
        "expected_requests": the_plan.expected,
        "getheaders_heights": the_plan.getheaders_heights,
        "chain": the_plan.chain,
        "headers": the_plan.headers,
        "blocks": the_plan.blocks,
        "cmpctblocks": the_plan.cmpctblocks,
        "txs": the_plan.txs,
        "blocktxn": the_plan.blocktxn,
        "notfound": the_plan.notfound,
    }
    data.write_text(json.dumps(content, indent=1) + "\n")
    out.write_text(render(the_plan, data.name, source, out.stem))
    out.chmod(0o755)
    return out, data, the_plan


TEMPLATE = '''#!/usr/bin/env python3
# Generated by `msgcap export --functional-test` from {source}.
"""Play the recorded peer of {source} to a fresh node and check that the node does what
the recording shows: its handshake, the requests the recording answers, and its tip.

The peer answers as the recording answers: a block or transaction asked for by its hash,
headers from the recorded chain after the first locator hash it knows, blocktxn from the
block. Everything else it recorded is sent unasked, in recorded order, each message once
the node has made the requests the recording shows it made before it. Blocks,
transactions and headers are in {data_name} beside this file.
"""

import json
import time
from pathlib import Path

from test_framework.messages import (
    {imports},
)
from test_framework.p2p import P2PInterface
from test_framework.test_framework import BitcoinTestFramework
from test_framework.util import assert_equal

DATA_FILE = Path(__file__).with_name("{data_name}")
MAX_HEADERS = 2000


def getheaders(locator, stop=0):
    msg = msg_getheaders()
    msg.locator.vHave = locator
    msg.hashstop = stop
    return msg


def getblocks(locator, stop=0):
    msg = msg_getblocks()
    msg.locator.vHave = locator
    msg.hashstop = stop
    return msg


class Recorded:
    """The recorded peer's blocks, transactions and headers (hashes as RPC prints them)."""

    def __init__(self, path):
        data = json.loads(path.read_text())
        self.expected = data["expected_requests"]
        self.getheaders_heights = data["getheaders_heights"]
        self.chain = data["chain"]
        self.position = {{h: i for i, h in enumerate(self.chain)}}
        self._headers = data["headers"]
        self._blocks = data["blocks"]
        self._cmpctblocks = data["cmpctblocks"]
        self._txs = data["txs"]
        self.notfound = set(data["notfound"])

    def has_block(self, h):
        return h in self._blocks

    def block_hex(self, h):
        return self._blocks[h]

    def block(self, h):
        return from_hex(CBlock(), self._blocks[h])

    def has_cmpctblock(self, h):
        return h in self._cmpctblocks

    def cmpctblock(self, h):
        return from_hex(msg_cmpctblock(), self._cmpctblocks[h])

    def has_tx(self, h):
        return h in self._txs

    def tx(self, h):
        return from_hex(CTransaction(), self._txs[h])

    def headers(self, hashes):
        return [from_hex(CBlockHeader(), self._headers[h]) for h in hashes]

    def after(self, locator, height):
        """The chain's hashes after the first locator hash on it, up to ``height`` (the
        chain's parent counts: a fresh node's locator names only the genesis block)."""
        if height == 0:  # the peer had shown no chain yet: an empty answer
            return []
        base = self._headers[self.chain[0]] if self.chain else None
        parent = bytes.fromhex(base[8:72])[::-1].hex() if base else None
        for h in locator:
            if h == parent:
                return self.chain[:height]
            if h in self.position:
                return self.chain[self.position[h] + 1:height]
        return None


class RecordedPeer(P2PInterface):
    """The recorded peer: its version and handshake, and its answers to the node."""

    def __init__(self, data):
        super().__init__(support_addrv2={support_addrv2}, wtxidrelay={wtxidrelay})
        self.data = data
        self.node_version = None
        self.before_verack = []
        self.node_verack = False
        self.served = set()
        self.unanswerable = []
        self.getheaders = 0
        self.shown = 0
        """How far along its chain the peer has gone in what it sent unasked."""

    def send_recorded(self, message):
        """Send without waiting (send_without_ping in Core since 2025, send_message before)."""
        (getattr(self, "send_without_ping", None) or self.send_message)(message)

    def peer_connect_send_version(self, services):
        super().peer_connect_send_version(services)
        version = self.on_connection_send_msg
        # The recorded peer's version (a fresh nonce and the current time; the user agent
        # stays the framework's, which add_p2p_connection checks).
        version.nVersion, version.nServices, version.nStartingHeight, version.relay = (
            {peer_version_values})

    def on_message(self, message):
        msgtype = message.msgtype.decode()
        if self.node_version is not None and not self.node_verack and msgtype != "verack":
            self.before_verack.append(msgtype)
        super().on_message(message)

    def on_version(self, message):
        self.node_version = message
        for msg in [{feature_messages}]:
            self.send_recorded(msg)
        self.send_recorded(msg_verack())

    def on_verack(self, message):
        self.node_verack = True

    def on_inv(self, message):
        pass  # the recording answers requests; it does not make its own here

    def on_getdata(self, message):
        missing = []
        for inv in message.inv:
            h = f"{{inv.hash:064x}}"
            base = inv.type & ~MSG_WITNESS_FLAG
            if base in (MSG_TX, MSG_WTX):
                if self.data.has_tx(h):
                    self.send_recorded(msg_tx(self.data.tx(h)))
                    self.served.add(f"tx {{h}}")
                elif h in self.data.notfound:
                    missing.append(inv)
                else:
                    self.unanswerable.append(f"tx {{h}}")
                continue
            if base == 4 and self.data.has_cmpctblock(h):  # MSG_CMPCT_BLOCK
                self.send_recorded(self.data.cmpctblock(h))
            elif self.data.has_block(h):
                self.send_recorded(msg_block(self.data.block(h)))
            elif h in self.data.notfound:
                missing.append(inv)
                continue
            else:
                self.unanswerable.append(f"block {{h}}")
                continue
            self.served.add(f"block {{h}}")
        if missing:
            self.send_recorded(msg_notfound(missing))

    def on_getheaders(self, message):
        locator = [f"{{h:064x}}" for h in message.locator.vHave]
        # As far along the chain as the recorded answer to this getheaders went, or as
        # the peer has shown since.
        heights = self.data.getheaders_heights
        recorded = heights[min(self.getheaders, len(heights) - 1)] if heights else 0
        after = self.data.after(locator, max(recorded, self.shown))
        if after is None:
            self.unanswerable.append(f"getheaders from {{locator[0] if locator else 'nothing'}}")
            return
        hashes = after[:MAX_HEADERS]
        stop = f"{{message.hashstop:064x}}"
        if stop in hashes:
            hashes = hashes[:hashes.index(stop) + 1]
        self.getheaders += 1
        self.send_recorded(msg_headers(self.data.headers(hashes)))

    def on_getblocktxn(self, message):
        request = message.block_txn_request
        h = f"{{request.blockhash:064x}}"
        if not self.data.has_block(h):
            self.unanswerable.append(f"blocktxn {{h}}")
            return
        block = self.data.block(h)
        answer = msg_blocktxn()
        answer.block_transactions = BlockTransactions(
            request.blockhash, [block.vtx[i] for i in request.to_absolute()])
        self.send_recorded(answer)


class {cls}(BitcoinTestFramework):
    def set_test_params(self):
        self.num_nodes = 1
        self.setup_clean_chain = True
        self.extra_args = [{extra_args!r}]

    def wait_for_requests(self, peer, n, timeout=60):
        """Until the node has made the first n requests the recording answers; fails
        naming what the node asked for that the recording does not hold, or what it did
        not ask for."""
        wanted = self.data.expected[:n]
        deadline = time.time() + timeout * self.options.timeout_factor
        while True:
            unanswerable = list(peer.unanswerable)
            assert not unanswerable, (f"the node asked for {{', '.join(unanswerable)}}, "
                                      "which the recording does not hold")
            missing = [w for w in wanted if w not in peer.served]
            if not missing:
                return
            assert peer.is_connected, f"the node disconnected before it asked for {{missing[0]}}"
            assert time.time() < deadline, (
                f"the node did not ask for {{missing[0]}} ({{len(missing)}} requests missing)")
            time.sleep(0.05)

    def submit(self, node, peer, h):
        """A block of the recorded node's own (it mined it, or had it before the
        recording): it sent it to the peer, so the fresh node gets it here."""
        peer.sync_with_ping()  # the node has processed everything sent so far
        result = node.submitblock(self.data.block_hex(h))
        assert result in (None, "duplicate"), f"block {{h}} of the node's own: {{result}}"

    def run_test(self):
        node = self.nodes[0]
        self.data = Recorded(DATA_FILE)
        peer = node.add_p2p_connection(RecordedPeer(self.data), supports_v2_p2p=False)
{handshake}
        # What the recorded peer sent unasked, in recorded order (and the blocks the
        # recorded node had of its own, where it first sent them).
{script}

        # Every request the recording answers, then a ping round trip.
        self.wait_for_requests(peer, {expected})
        peer.sync_with_ping()
        self.wait_for_requests(peer, {expected})
{getheaders}{tip}

if __name__ == "__main__":
    {cls}(__file__).main()
'''
