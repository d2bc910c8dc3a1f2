"""The ut_pex (BEP 11) and ut_holepunch (BEP 55) cores: parsers against
hostile input (hypothesis: parsed or our own exception, nothing else),
round trips, the once-a-minute rule both ways, bounded messages, and the
relay's error codes."""

from __future__ import annotations

import ipaddress

import pytest
import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import bt
from _utpkit.bencode import encode
from bt.holepunch import (ERR_NO_SELF, ERR_NO_SUCH_PEER, ERR_NO_SUPPORT, ERR_NOT_CONNECTED,
                          HolepunchError, HolepunchMessage, MsgType, encode_holepunch,
                          parse_holepunch_untrusted, relay_error)
from bt.pex import (MAX_ADDED, MAX_BURST, MAX_DROPPED, MAX_TAKEN, PEX_INTERVAL, PexError,
                    PexPeer, PexReceiver, PexSender, encode_pex, parse_pex_untrusted)
from bt.wire import Extended, ExtensionHandshake, Handshake
from testsupport import ScriptedPeer, bt_content

v4 = st.builds(lambda b, p: (str(ipaddress.IPv4Address(b)), p),
               st.integers(0, 2**32 - 1), st.integers(1, 65535))
v6 = st.builds(lambda b, p: (str(ipaddress.IPv6Address(b)), p),
               st.integers(0, 2**128 - 1), st.integers(1, 65535)).filter(
    lambda a: ipaddress.IPv6Address(a[0]).ipv4_mapped is None)
addrs = st.one_of(v4, v6)


# ---- ut_pex ------------------------------------------------------------------------------

@given(st.binary(max_size=300))
def test_pex_parser_random_bytes(data):
    try:
        parse_pex_untrusted(data)
    except PexError:
        pass


pex_values = st.one_of(st.binary(max_size=60), st.integers(), st.lists(st.binary(max_size=6)))
pex_keys = st.sampled_from([b"added", b"added.f", b"dropped", b"added6", b"added6.f",
                            b"dropped6", b"x"])


@given(st.dictionaries(pex_keys, pex_values, max_size=7))
def test_pex_parser_structured(d):
    try:
        msg = parse_pex_untrusted(encode(d))
    except PexError:
        return
    assert all(p.addr[1] > 0 for p in msg.added)
    assert len(msg.added) <= MAX_TAKEN


@given(st.lists(st.tuples(addrs, st.integers(0, 255)), max_size=40, unique_by=lambda t: t[0]),
       st.lists(addrs, max_size=40))
def test_pex_round_trip(added, dropped):
    msg = parse_pex_untrusted(encode_pex([PexPeer(a, f) for a, f in added], dropped))
    # IPv4 first, then IPv6, each in order
    order = sorted(range(len(added)), key=lambda i: ":" in added[i][0][0])
    assert [(p.addr, p.flags) for p in msg.added] == [added[i] for i in order]
    assert sorted(msg.dropped) == sorted(dropped)


def test_pex_strictness():
    with pytest.raises(PexError, match="whole 6-byte"):
        parse_pex_untrusted(encode({b"added": b"\x01" * 7}))
    with pytest.raises(PexError, match="flags for"):
        parse_pex_untrusted(encode({b"added": b"\x01" * 12, b"added.f": b"\x00"}))
    with pytest.raises(PexError, match="not a byte string"):
        parse_pex_untrusted(encode({b"dropped6": 5}))
    with pytest.raises(PexError, match="not a dictionary"):
        parse_pex_untrusted(encode([1]))
    # port 0 is skipped, not an error; flags may be absent
    msg = parse_pex_untrusted(encode({b"added": b"\x01\x02\x03\x04\x00\x00\x05\x06\x07\x08\x00\x50"}))
    assert [p.addr for p in msg.added] == [("5.6.7.8", 80)] and msg.skipped == 1


def test_pex_sender_diffs_once_a_minute_and_bounded():
    s = PexSender()
    peers = {(f"10.0.{i // 256}.{i % 256}", 6881): 0x04 for i in range(120)}
    first = parse_pex_untrusted(s.build(0.0, peers))
    assert len(first.added) == MAX_ADDED and not first.dropped
    assert s.build(1.0, peers) is None                      # within the minute
    assert s.build(PEX_INTERVAL - 0.001, peers) is None
    second = parse_pex_untrusted(s.build(PEX_INTERVAL, peers))
    assert len(second.added) == MAX_ADDED
    assert not {p.addr for p in first.added} & {p.addr for p in second.added}
    third = parse_pex_untrusted(s.build(2 * PEX_INTERVAL, {}))
    assert not third.added and len(third.dropped) == MAX_DROPPED
    assert s.sent == 3
    # nothing new: nothing sent, and the next news may go out at once
    s2 = PexSender()
    assert s2.build(0.0, {}) is None
    assert s2.build(0.5, {("1.2.3.4", 1): 0}) is not None


def test_pex_receiver_rate_and_known():
    r = PexReceiver()
    a, b = ("1.1.1.1", 10), ("2.2.2.2", 20)
    r.receive(encode_pex([PexPeer(a, 8), PexPeer(b, 0)], []), 0.0)
    r.receive(encode_pex([], [b]), 1.0)
    assert r.known == {a: 8}
    for i in range(MAX_BURST - 2):
        r.receive(encode_pex([], []), 2.0 + i)
    with pytest.raises(PexError, match="more than"):
        r.receive(encode_pex([], []), 30.0)
    r.receive(encode_pex([], []), 70.0)      # the window moved on


# ---- ut_holepunch ------------------------------------------------------------------------

@given(st.binary(max_size=40))
def test_holepunch_parser_random_bytes(data):
    try:
        parse_holepunch_untrusted(data)
    except HolepunchError:
        pass


@given(st.sampled_from(list(MsgType)), addrs, st.integers(0, 2**32 - 1))
def test_holepunch_round_trip(kind, addr, code):
    msg = HolepunchMessage(kind, addr, code if kind is MsgType.ERROR else 0)
    raw = encode_holepunch(msg)
    assert len(raw) == 2 + (4 if ":" not in addr[0] else 16) + 2 + (4 if kind is MsgType.ERROR
                                                                      else 0)
    assert parse_holepunch_untrusted(raw) == msg
    if kind is not MsgType.ERROR:        # with a (zero) code appended, as some clients send
        assert parse_holepunch_untrusted(raw + bytes(4)) == msg


@settings(max_examples=50)
@given(st.binary(min_size=1, max_size=3))
def test_holepunch_trailing_garbage_is_a_violation(extra):
    raw = encode_holepunch(HolepunchMessage(MsgType.CONNECT, ("1.2.3.4", 5)))
    if len(extra) == 4:
        return
    with pytest.raises(HolepunchError):
        parse_holepunch_untrusted(raw + extra)


def test_holepunch_known_bytes():
    # rendezvous to 10.0.0.1:6881 (BEP 55 layout)
    raw = bytes([0, 0, 10, 0, 0, 1, 0x1A, 0xE1])
    assert parse_holepunch_untrusted(raw) == HolepunchMessage(MsgType.RENDEZVOUS,
                                                              ("10.0.0.1", 6881))
    with pytest.raises(HolepunchError, match="code needs 4"):
        parse_holepunch_untrusted(bytes([2, 0, 10, 0, 0, 1, 0x1A, 0xE1]))
    with pytest.raises(HolepunchError, match="address type"):
        parse_holepunch_untrusted(bytes([1, 2, 10, 0, 0, 1, 0x1A, 0xE1]))
    with pytest.raises(HolepunchError, match="message type"):
        parse_holepunch_untrusted(bytes([3, 0, 10, 0, 0, 1, 0x1A, 0xE1]))


def test_relay_errors():
    me, other = ("1.1.1.1", 100), ("2.2.2.2", 200)
    assert relay_error(other, me, connected=True, supports=True) == 0
    assert relay_error(other, me, connected=False, supports=False) == ERR_NOT_CONNECTED
    assert relay_error(other, me, connected=True, supports=False) == ERR_NO_SUPPORT
    assert relay_error(me, me, connected=True, supports=True) == ERR_NO_SELF
    assert relay_error(("::ffff:1.1.1.1", 100), me, connected=True, supports=True) == ERR_NO_SELF
    assert relay_error(("0.0.0.0", 5), me, connected=False, supports=False) == ERR_NO_SUCH_PEER
    assert relay_error(("2.2.2.2", 0), me, connected=False, supports=False) == ERR_NO_SUCH_PEER


# ---- on a real connection: violations end it and are counted; the relay answers ----------

class _Raw(ScriptedPeer):
    """A scripted peer over TCP to one of our sessions, speaking the two
    extensions."""

    def __init__(self, stream, meta) -> None:
        super().__init__(stream, meta)
        self.extended: list[Extended] = []

    def on_event(self, ev) -> None:
        if isinstance(ev, Extended):
            self.extended.append(ev)

    async def start(self, m: dict[str, int] | None = None) -> None:
        self.core.send(Handshake.make(self.meta.info_hash, b"-XX0001-" + bytes(12)))
        await self.flush()
        with trio.fail_after(10):
            while self.core.peer_ext_handshake is None:
                await self.pump()
        self.core.send(ExtensionHandshake(m={"ut_pex": 1, "ut_holepunch": 4} if m is None else m))
        await self.flush()

    async def send_ext(self, name: str, payload: bytes, ext_id: int | None = None) -> None:
        """An extension message by name (the core finds our session's id),
        or raw under ``ext_id``."""
        if ext_id is None:
            self.core.send(Extended(0, payload, name))
            await self.flush()
            return
        await self.flush()
        body = bytes([20, ext_id]) + payload
        await self.stream.send_all(len(body).to_bytes(4, "big") + body)

    async def wait_closed(self) -> None:
        with trio.fail_after(10):
            while not self.closed:
                await self.pump()


@pytest.mark.parametrize("name,payload,counter", [
    ("ut_pex", encode({b"added": b"\x01" * 7}), "pex.violation.bad_length"),
    ("ut_pex", b"d5:added", "pex.violation.bad_bencode"),
    ("ut_holepunch", bytes([0, 7, 1, 2, 3, 4, 0, 80]), "holepunch.violation.bad_addr_type"),
    ("ut_holepunch", bytes([9, 0, 1, 2, 3, 4, 0, 80]), "holepunch.violation.bad_type"),
])
async def test_malformed_message_ends_the_connection_and_is_counted(tmp_path, name, payload,
                                                                    counter):
    src, _, data = bt_content(tmp_path, (100_000,), name="h", seed=5)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as ours:
        t = await ours.add_torrent(data)
        raw = _Raw(await trio.open_tcp_stream("127.0.0.1", ours.port), t.meta)
        await raw.start()
        await raw.send_ext(name, payload)
        await raw.wait_closed()
        counters = t.status().counters
        assert counters[counter] == 1, counters
        assert counters["violation.bad_extended"] == 1, counters


async def test_pex_flood_and_relay_errors(tmp_path):
    src, _, data = bt_content(tmp_path, (100_000,), name="h", seed=5)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as ours:
        t = await ours.add_torrent(data)
        raw = _Raw(await trio.open_tcp_stream("127.0.0.1", ours.port), t.meta)
        await raw.start()
        # relay: a target nobody is connected to, ourselves, a bad endpoint
        me = raw.stream.socket.getsockname()
        for target in (("10.9.9.9", 6881), ("127.0.0.1", me[1]), ("0.0.0.0", 1)):
            await raw.send_ext("ut_holepunch", encode_holepunch(
                HolepunchMessage(MsgType.RENDEZVOUS, target)))
        with trio.fail_after(10):
            while len([e for e in raw.extended if e.name == "ut_holepunch"]) < 3:
                await raw.pump()
        answers = [parse_holepunch_untrusted(e.payload) for e in raw.extended
                   if e.name == "ut_holepunch"]
        assert [(a.msg_type, a.error) for a in answers] == [
            (MsgType.ERROR, ERR_NOT_CONNECTED), (MsgType.ERROR, ERR_NO_SELF),
            (MsgType.ERROR, ERR_NO_SUCH_PEER)]
        assert answers[0].addr == ("10.9.9.9", 6881)
        # PEX: MAX_BURST messages are fine, one more within the minute ends it
        for _ in range(MAX_BURST):
            await raw.send_ext("ut_pex", encode_pex([], []))
        assert not raw.closed
        await raw.send_ext("ut_pex", encode_pex([], []))
        await raw.wait_closed()
        counters = t.status().counters
        assert counters["pex.violation.too_frequent"] == 1, counters
        assert counters["pex.received"] == MAX_BURST
        assert counters["holepunch.relay_error.NotConnected"] == 1
        assert counters["holepunch.relay_error.NoSelf"] == 1
        assert counters["holepunch.relay_error.NoSuchPeer"] == 1


async def test_holepunch_from_a_peer_that_did_not_announce_it_is_ignored(tmp_path):
    # we could not answer it (no id to send under): ignored, as libtorrent does
    src, _, data = bt_content(tmp_path, (100_000,), name="h", seed=5)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as ours:
        t = await ours.add_torrent(data)
        raw = _Raw(await trio.open_tcp_stream("127.0.0.1", ours.port), t.meta)
        await raw.start(m={"ut_pex": 1})
        await raw.send_ext("ut_holepunch", encode_holepunch(
            HolepunchMessage(MsgType.RENDEZVOUS, ("10.9.9.9", 6881))),
            ext_id=ours.extensions.local_id("ut_holepunch"))
        with trio.fail_after(10):
            while not t.status().counters.get("holepunch.ignored_unannounced"):
                await trio.sleep(0.02)
        with trio.move_on_after(0.5):
            await raw.wait_closed()         # (it must not close)
        assert not raw.closed and t.peers
