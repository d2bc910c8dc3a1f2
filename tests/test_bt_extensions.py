"""The BEP 10 extension registry (bt.extensions) between two real peer-wire
cores: ids chosen per side, dispatch by the peer's ids, handshake fields,
per-connection opt-out, and malformed payloads ending the connection."""

from __future__ import annotations

import pytest

from _utpkit.errors import LocalProtocolError, RemoteProtocolError
from bt.extensions import Extension, ExtensionHandler, ExtensionRegistry
from bt.peerwire import PeerWire
from bt.wire import ExtensionHandshake, Extended, Handshake, Violation, WireError

IH = bytes(range(20))


class EchoHandler(ExtensionHandler):
    name = "x_echo"

    def __init__(self) -> None:
        super().__init__()
        self.got: list[bytes] = []

    def handshake_fields(self):
        return {b"x_echo_size": 5, b"metadata_size": 777}

    def receive_untrusted(self, payload: bytes, now: float) -> None:
        if payload == b"bad":
            raise RemoteProtocolError("x_echo: bad payload")
        self.got.append(payload)
        if not payload.startswith(b"re:"):
            self.send_payload(b"re:" + payload)


class Echo(Extension):
    name = "x_echo"

    def handler(self, peer):
        return None if peer == "no-echo" else EchoHandler()


class Other(Extension):
    name = "x_other"

    def handler(self, peer):
        return ExtensionHandler()


def drain(core):
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


def connect(reg_a, reg_b, peer_a="a", peer_b="b"):
    a, b = PeerWire(now=0), PeerWire(now=0)
    a.send(Handshake.make(IH, b"A" * 20))
    b.receive_data(a.data_to_send(), 0)
    drain(b)
    b.send(Handshake.make(IH, b"B" * 20))
    a.receive_data(b.data_to_send(), 0)
    drain(a)
    ea, eb = reg_a.connection(peer_a), reg_b.connection(peer_b)
    a.send(ea.handshake(v="A", peer_addr=("10.1.2.3", 5)))
    b.send(eb.handshake(v="B"))
    return a, b, ea, eb


def pump(src, dst, ext_dst):
    """Deliver src's bytes to dst and dispatch dst's extension events."""
    dst.receive_data(src.data_to_send(), 0)
    for ev in drain(dst):
        if isinstance(ev, ExtensionHandshake):
            ext_dst.on_handshake(ev, 0)
        elif isinstance(ev, Extended):
            ext_dst.on_extended(ev, 0)
    for msg in ext_dst.outgoing():
        dst.send(msg)


def test_ids_differ_per_side_and_messages_are_dispatched_by_name():
    reg_a = ExtensionRegistry()
    reg_a.register(Echo(), local_id=9)
    reg_b = ExtensionRegistry([Other(), Echo()])
    assert reg_b.local_id("x_other") != reg_b.local_id("x_echo")
    a, b, ea, eb = connect(reg_a, reg_b)
    pump(a, b, eb)
    pump(b, a, ea)
    assert eb.peer_handshake.m == {"x_echo": 9}
    assert eb.peer_handshake.metadata_size == 777
    assert eb.peer_handshake.extra[b"x_echo_size"] == 5
    assert eb.peer_handshake.yourip_address == "10.1.2.3"
    assert ea.get("x_echo").peer_supports and eb.get("x_echo").peer_supports
    assert not eb.get("x_other").peer_supports          # A never offered it
    ea.get("x_echo").send_payload(b"hello")
    for msg in ea.outgoing():
        a.send(msg)
    pump(a, b, eb)          # B answers "re:hello" under A's id 9
    pump(b, a, ea)
    assert eb.get("x_echo").got == [b"hello"]
    assert ea.get("x_echo").got == [b"re:hello"]
    with pytest.raises(LocalProtocolError):
        eb.get("x_other").send_payload(b"x")            # the peer does not speak it


def test_an_extension_can_stay_off_a_connection():
    reg = ExtensionRegistry([Echo(), Other()])
    conn = reg.connection("no-echo")
    assert "x_echo" not in conn and "x_other" in conn
    assert set(conn.handshake().m) == {"x_other"}


def test_a_malformed_payload_is_a_bad_extended_violation():
    reg = ExtensionRegistry([Echo()])
    a, b, ea, eb = connect(reg, reg)
    pump(a, b, eb)
    pump(b, a, ea)
    ea.get("x_echo").send_payload(b"bad")
    for msg in ea.outgoing():
        a.send(msg)
    with pytest.raises(WireError) as exc:
        pump(a, b, eb)
    assert exc.value.reason is Violation.BAD_EXTENDED


def test_registry_rejects_clashes():
    reg = ExtensionRegistry([Echo()])
    with pytest.raises(LocalProtocolError):
        reg.register(Echo())
    with pytest.raises(LocalProtocolError):
        reg.register(Other(), local_id=reg.local_id("x_echo"))
    with pytest.raises(LocalProtocolError):
        reg.register(Other(), local_id=0)
