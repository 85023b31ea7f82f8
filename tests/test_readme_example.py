"""The README's example test, as written there (keeps the README true)."""

from pathlib import Path

CAPTURE = Path(__file__).parent / "data" / "core-v30-pair" / "a" / "127.0.0.1_39912"


def test_recorded_handshake(msgcap_capture):  # type: ignore[no-untyped-def]
    messages = msgcap_capture(CAPTURE)  # typed messages, in time order
    sent = [m.msgtype for m in messages if m.direction == "sent"]
    assert sent[:4] == ["version", "wtxidrelay", "sendaddrv2", "verack"]
    assert messages[0].message.user_agent == "/Satoshi:30.99.0/"
