"""The peer-wire codec (bt.wire) and core (bt.peerwire), sans-I/O: two cores
wired back to back, hostile byte strings, and hypothesis fuzzing."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from _utpkit.errors import LocalProtocolError, RemoteProtocolError
from bt.peerwire import ConnState, ConnectionClosed, PeerWire, RequestsDropped
from bt.wire import (BLOCK_SIZE, AllowedFast, Bitfield, Cancel, Choke, Extended,
                     ExtensionHandshake, Geometry, Handshake, Have, HaveAll, HaveNone,
                     Interested, KeepAlive, NotInterested, Piece, Port, Reject, Request, Suggest,
                     Unchoke, UnknownMessage, Violation, WireError, allowed_fast_set,
                     decode_message_untrusted, encode_message, parse_handshake_untrusted)

IH = bytes(range(20))
G = Geometry(total_length=10 * 32768 + 5000, piece_length=32768)   # 11 pieces, last short


def wire(msg) -> bytes:
    return b"".join(bytes(c) for c in encode_message(msg))


def drain(core):
    out = []
    while (ev := core.next_event()) is not None:
        out.append(ev)
    return out


def pair(fast=True, ext=True, geometry=G, now=0.0):
    """An initiator and an acceptor, handshaken; events drained."""
    a = PeerWire(now=now, geometry=geometry)
    b = PeerWire(now=now, geometry=geometry)
    a.send(Handshake.make(IH, b"A" * 20, fast=fast, extensions=ext))
    b.receive_data(a.data_to_send(), now)
    hs = drain(b)
    assert hs == [Handshake.make(IH, b"A" * 20, fast=fast, extensions=ext)]
    assert b.state is ConnState.AWAIT_CONFIRM
    b.send(Handshake.make(IH, b"B" * 20, fast=fast, extensions=ext))
    a.receive_data(b.data_to_send(), now)
    assert [type(e) for e in drain(a)] == [Handshake]
    assert a.state is b.state is ConnState.OPEN
    return a, b


def xfer(src, dst, now=0.0):
    data = src.data_to_send()
    if data:
        dst.receive_data(data, now)
    return drain(dst)


# ---- codec -------------------------------------------------------------------------------

ALL = [KeepAlive(), Choke(), Unchoke(), Interested(), NotInterested(), Have(7),
       Bitfield(b"\xff\xe0"), Request(1, 16384, 16384), Piece(2, 0, b"x" * 100),
       Cancel(1, 0, 16384), Port(6881), Suggest(3), HaveAll(), HaveNone(), Reject(1, 0, 5),
       AllowedFast(9), Extended(3, b"d1:ai1ee"),
       ExtensionHandshake(m={"ut_metadata": 2, "ut_pex": 1}, v="utpkit 0.1", p=6881, reqq=500,
                          yourip=bytes([10, 0, 0, 1]), metadata_size=12345,
                          extra={b"upload_only": 1}),
       UnknownMessage(21, b"hash")]


@pytest.mark.parametrize("msg", ALL, ids=lambda m: type(m).__name__)
def test_codec_round_trip(msg):
    data = wire(msg)
    assert struct.unpack(">I", data[:4])[0] == len(data) - 4
    back = decode_message_untrusted(memoryview(data)[4:])
    if isinstance(msg, Piece):
        assert back.key == msg.key and bytes(back.data) == msg.data
        assert isinstance(back.data, memoryview)       # no copy of the block
    elif isinstance(msg, (Extended, UnknownMessage)):
        assert type(back) is type(msg) and bytes(back.payload) == msg.payload
    else:
        assert back == msg


def test_handshake_bits():
    hs = Handshake.make(IH, b"P" * 20, extensions=True, fast=True, dht=True)
    assert hs.reserved == bytes([0, 0, 0, 0, 0, 0x10, 0, 0x05])
    wire_hs = b"\x13BitTorrent protocol" + hs.reserved + IH + b"P" * 20
    back = parse_handshake_untrusted(wire_hs)
    assert back == hs and back.extensions and back.fast and back.dht
    none = Handshake.make(IH, b"P" * 20, extensions=False, fast=False)
    assert not (none.extensions or none.fast or none.dht)
    with pytest.raises(WireError) as ei:
        parse_handshake_untrusted(b"\x13BitTorrent protocoX" + bytes(48))
    assert ei.value.reason is Violation.BAD_HANDSHAKE


def test_allowed_fast_set_matches_bep6_vectors():
    # The worked example in BEP 6.
    assert allowed_fast_set("80.4.4.200", b"\xaa" * 20, 1313, 7) == \
        [1059, 431, 808, 1217, 287, 376, 1188]
    assert allowed_fast_set("80.4.4.200", b"\xaa" * 20, 1313, 9) == \
        [1059, 431, 808, 1217, 287, 376, 1188, 353, 508]
    # the /24 is what counts
    assert allowed_fast_set("80.4.4.1", b"\xaa" * 20, 1313, 9) == \
        allowed_fast_set("80.4.4.200", b"\xaa" * 20, 1313, 9)
    assert sorted(allowed_fast_set("::ffff:80.4.4.200", b"\xaa" * 20, 5, 10)) == [0, 1, 2, 3, 4]


def test_messages_validate_on_construction():
    for bad in (lambda: Have(-1), lambda: Request(0, 0, 1 << 32), lambda: Port(70000),
                lambda: Piece(0, 0, b""), lambda: Piece(0, 0, bytes(BLOCK_SIZE + 1)),
                lambda: Handshake(b"short", b"P" * 20), lambda: Extended(256, b""),
                lambda: ExtensionHandshake(m={"x": 300})):
        with pytest.raises(LocalProtocolError):
            bad()


def test_extension_handshake_tolerates_odd_fields():
    from _utpkit.bencode import encode
    body = encode({b"m": {b"ut_pex": 1, b"bad": 999, b"neg": -1}, b"p": 0, b"reqq": b"x",
                   b"v": b"\xff\xfeclient", b"yourip": b"123", b"e": 1})
    hs = ExtensionHandshake.from_payload_untrusted(body)
    assert hs.m == {"ut_pex": 1} and hs.p is None and hs.reqq is None and hs.yourip is None
    assert hs.v.endswith("client") and hs.extra == {b"e": 1}
    for bad in (b"le", b"d1:mi1ee", b"i3e", b"not bencode", b"d1:b0:1:a0:e"):
        with pytest.raises(WireError) as ei:
            ExtensionHandshake.from_payload_untrusted(bad)
        assert ei.value.reason is Violation.BAD_EXTENDED


# ---- the core: happy paths ---------------------------------------------------------------


def test_handshake_and_negotiation():
    a, b = pair(fast=True, ext=True)
    assert a.fast and a.extensions and b.fast and not a.dht
    c = PeerWire(now=0)
    c.send(Handshake.make(IH, b"C" * 20, fast=False))
    d = PeerWire(now=0)
    d.receive_data(c.data_to_send(), 0)
    d.send(Handshake.make(IH, b"D" * 20, fast=True))
    assert not d.fast and d.extensions


def test_infohash_mismatch_and_acceptor_confirm():
    a = PeerWire(now=0)
    a.send(Handshake.make(IH, b"A" * 20))
    b = PeerWire(now=0)
    b.receive_data(a.data_to_send(), 0)
    drain(b)
    with pytest.raises(LocalProtocolError):
        b.send(Handshake.make(b"\x01" * 20, b"B" * 20))     # not what the peer asked for
    c = PeerWire(now=0)
    c.send(Handshake.make(b"\x01" * 20, b"C" * 20))
    with pytest.raises(WireError) as ei:
        a.receive_data(c.data_to_send(), 0)
    assert ei.value.reason is Violation.INFOHASH_MISMATCH and a.state is ConnState.ERROR
    with pytest.raises(WireError):            # the error state sticks
        a.receive_data(b"\0\0\0\0", 0)
    with pytest.raises(LocalProtocolError):
        a.send(Interested())


def test_acceptor_holds_messages_until_it_confirms():
    a = PeerWire(now=0, geometry=G)
    a.send(Handshake.make(IH, b"A" * 20))
    b = PeerWire(now=0, geometry=G)
    b.receive_data(a.data_to_send(), 0)
    # the initiator's messages arrive before the acceptor answers
    b.receive_data(wire(HaveAll()) + wire(Interested()), 0)
    assert [type(e) for e in drain(b)] == [Handshake]
    b.send(Handshake.make(IH, b"B" * 20))
    assert drain(b) == [HaveAll(), Interested()]
    assert b.peer_interested


def test_request_piece_flow_and_memoryview_payload():
    a, b = pair()
    b.send(HaveAll())
    b.send(Unchoke())
    assert xfer(b, a) == [HaveAll(), Unchoke()]
    a.send(Interested())
    a.send(Request(3, 0, BLOCK_SIZE))
    a.send(Request(10, 0, 5000))
    assert xfer(a, b) == [Interested(), Request(3, 0, BLOCK_SIZE), Request(10, 0, 5000)]
    assert b.peer_interested and a.outstanding == 2
    b.send(Piece(10, 0, b"z" * 5000))
    b.send(Piece(3, 0, b"y" * BLOCK_SIZE))
    evs = xfer(b, a)
    assert [e.key for e in evs] == [(10, 0, 5000), (3, 0, BLOCK_SIZE)]
    assert all(isinstance(e.data, memoryview) for e in evs)
    assert a.outstanding == 0 and b.incoming_requests() == []


def test_choke_without_fast_drops_requests_both_ways():
    a, b = pair(fast=False)
    b.send(Bitfield.from_indices(range(11), 11))
    b.send(Unchoke())
    xfer(b, a)
    a.send(Request(0, 0, BLOCK_SIZE))
    a.send(Request(0, BLOCK_SIZE, BLOCK_SIZE))
    xfer(a, b)
    b.send(Choke())
    assert b.incoming_requests() == []
    b.send(Piece(0, 0, b"q" * BLOCK_SIZE))       # a disk read that finished late
    assert b.statistics()["answers_dropped"] == 1
    evs = xfer(b, a)
    assert evs == [Choke(), RequestsDropped((Request(0, 0, BLOCK_SIZE),
                                             Request(0, BLOCK_SIZE, BLOCK_SIZE)))]
    with pytest.raises(LocalProtocolError):
        a.send(Request(0, 0, BLOCK_SIZE))       # choked, and no allowed-fast without BEP 6


def test_fast_choke_rejects_all_but_allowed_fast():
    a, b = pair(fast=True)
    b.send(HaveAll())
    b.send(AllowedFast(4))
    b.send(Unchoke())
    assert xfer(b, a) == [HaveAll(), AllowedFast(4), Unchoke()]
    assert a.allowed_fast_in == {4}
    for r in (Request(1, 0, BLOCK_SIZE), Request(4, 0, BLOCK_SIZE), Request(2, 0, 100)):
        a.send(r)
    xfer(a, b)
    b.send(Choke())
    evs = xfer(b, a)
    assert evs == [Choke(), Reject(1, 0, BLOCK_SIZE), Reject(2, 0, 100)]
    assert a.outstanding_requests() == [Request(4, 0, BLOCK_SIZE)]
    # still choked: allowed-fast pieces may be requested, others may not
    a.send(Request(4, BLOCK_SIZE, BLOCK_SIZE))
    with pytest.raises(LocalProtocolError):
        a.send(Request(5, 0, BLOCK_SIZE))
    # a request for a non-allowed piece while choked is answered with a reject
    c, d = pair(fast=True)
    d.send(HaveAll())
    xfer(d, c)
    c.send(Unchoke())      # c lets d request
    xfer(c, d)
    d.send(Request(0, 0, 10))
    assert xfer(d, c) == []                     # c has nothing: rejected, not delivered
    assert xfer(c, d) == [Reject(0, 0, 10)]


def test_cancel_with_fast_is_answered_with_reject():
    a, b = pair(fast=True)
    b.send(HaveAll())
    b.send(Unchoke())
    xfer(b, a)
    a.send(Request(0, 0, 100))
    xfer(a, b)
    a.send(Cancel(0, 0, 100))
    a.send(Cancel(0, 0, 200))                   # never requested: not sent at all
    assert xfer(a, b) == [Cancel(0, 0, 100)]
    assert xfer(b, a) == []                     # the reject for a cancelled request is quiet
    assert a.outstanding == 0


def test_late_block_after_cancel_is_not_a_violation():
    a, b = pair(fast=False)
    b.send(Bitfield.from_indices([0], 11))
    b.send(Unchoke())
    xfer(b, a)
    a.send(Request(0, 0, 100))
    xfer(a, b)
    b.send(Piece(0, 0, b"x" * 100))      # crosses our cancel on the wire
    a.send(Cancel(0, 0, 100))
    evs = xfer(b, a)
    assert [type(e) for e in evs] == [Piece] and a.statistics()["late_pieces"] == 1
    # the same block again is unrequested
    with pytest.raises(WireError) as ei:
        a.receive_data(wire(Piece(0, 0, b"x" * 100)), 0)
    assert ei.value.reason is Violation.UNREQUESTED_PIECE


def test_extension_messages_are_routed_by_name():
    a, b = pair()
    a.send(ExtensionHandshake(m={"ut_metadata": 3}, reqq=100))
    b.send(ExtensionHandshake(m={"ut_metadata": 7, "ut_pex": 1}))
    assert xfer(a, b)[0].m == {"ut_metadata": 3}
    xfer(b, a)
    assert b.peer_reqq == 100 and a.peer_extensions == {"ut_metadata": 7, "ut_pex": 1}
    a.send(Extended(0, b"d8:msg_typei0e5:piecei0ee", name="ut_metadata"))
    raw = a.data_to_send()
    assert raw[5] == 7                            # the peer's id for ut_metadata
    b.receive_data(raw, 0)
    (ev,) = drain(b)
    assert ev.name == "ut_metadata" and ev.ext_id == 7 and bytes(ev.payload).startswith(b"d8")
    with pytest.raises(LocalProtocolError):
        a.send(Extended(0, b"", name="ut_holepunch"))
    with pytest.raises(WireError) as ei:          # an id b never offered
        a.receive_data(wire(Extended(9, b"x")), 0)
    assert ei.value.reason is Violation.BAD_EXTENDED


def test_keepalive_and_timeouts():
    a, b = pair(now=100.0)
    assert a.get_timer() == 160.0
    a.handle_timer(160.0)
    assert a.data_to_send() == bytes(4)
    assert a.get_timer() == 220.0
    b.receive_data(bytes(4), 161.0)
    assert drain(b) == [KeepAlive()]
    a.handle_timer(279.9)
    a.data_to_send()
    with pytest.raises(WireError) as ei:
        a.handle_timer(280.0)                     # nothing heard since t=100
    assert ei.value.reason is Violation.IDLE_TIMEOUT and a.get_timer() is None
    c = PeerWire(now=0.0)
    assert c.get_timer() == 20.0
    with pytest.raises(WireError) as ei:
        c.handle_timer(20.0)
    assert ei.value.reason is Violation.HANDSHAKE_TIMEOUT


def test_end_of_stream():
    a, b = pair()
    a.receive_data(b"", 1.0)
    assert drain(a) == [ConnectionClosed()] and a.state is ConnState.CLOSED
    assert a.get_timer() is None


# ---- the core: violations ----------------------------------------------------------------

def _violation(peer_bytes: bytes, *, fast=True, ext=True, setup=None) -> Violation:
    a, b = pair(fast=fast, ext=ext)
    if setup:
        setup(a, b)
    with pytest.raises(WireError) as ei:
        a.receive_data(peer_bytes, 1.0)
    assert a.state is ConnState.ERROR
    return ei.value.reason


def test_each_violation_has_its_reason():
    def unchoke_a(a, b):
        a.send(HaveAll())
        a.send(Unchoke())

    cases = [
        (struct.pack(">I", 1 << 20) + b"\x07", {}, Violation.MESSAGE_TOO_LONG),
        (wire(Bitfield(b"\xff")), {}, Violation.BAD_BITFIELD),               # 11 pieces: 2 bytes
        (wire(Bitfield(b"\xff\xff")), {}, Violation.BAD_BITFIELD),           # spare bits set
        (wire(Have(1)) + wire(Bitfield(b"\xff\xe0")), {}, Violation.LATE_BITFIELD),
        (wire(Unchoke()) + wire(HaveNone()), {}, Violation.LATE_BITFIELD),
        (wire(Have(11)), {}, Violation.BAD_INDEX),
        (wire(Suggest(1000)), {}, Violation.BAD_INDEX),
        (wire(Request(10, 4096, 1000)), {}, Violation.BAD_BLOCK),           # past the short piece
        (wire(Request(0, 0, BLOCK_SIZE + 1)), {}, Violation.BAD_BLOCK),
        (wire(HaveAll()), {"fast": False}, Violation.NOT_NEGOTIATED),
        (wire(Reject(0, 0, 1)), {"fast": False}, Violation.NOT_NEGOTIATED),
        (wire(ExtensionHandshake()), {"ext": False}, Violation.NOT_NEGOTIATED),
        (wire(Piece(0, 0, b"x")), {}, Violation.UNREQUESTED_PIECE),
        (b"\0\0\0\x02\x04\0", {}, Violation.BAD_LENGTH),                    # a short have
        (b"\0\0\0\x01\x07", {}, Violation.BAD_LENGTH),
        (b"".join(wire(Request(i % 10, (i // 10) * BLOCK_SIZE, BLOCK_SIZE)) for i in range(20))
         + wire(Request(0, 0, 1)), {"setup": lambda a, b: (unchoke_a(a, b), setattr(a, "reqq", 20))},
         Violation.REQUEST_FLOOD),
    ]
    for data, kw, reason in cases:
        assert _violation(data, **kw) is reason, (data[:20], reason)


def test_acceptor_buffer_is_capped_until_it_confirms():
    a = PeerWire(now=0, geometry=G)
    a.send(Handshake.make(IH, b"A" * 20))
    b = PeerWire(now=0, geometry=G)
    b.receive_data(a.data_to_send(), 0)
    b.receive_data(wire(Interested()) * 2000, 0)             # 10 kB: held
    with pytest.raises(WireError) as ei:
        b.receive_data(wire(Interested()) * 2000, 0)         # beyond one message's worth
    assert ei.value.reason is Violation.BUFFER_OVERFLOW


def test_unknown_messages_pass_through():
    a, b = pair()
    a.receive_data(wire(UnknownMessage(21, b"abc")), 0)
    (ev,) = drain(a)
    assert ev.msg_id == 21 and bytes(ev.payload) == b"abc"
    assert a.statistics()["unknown_messages"] == 1


def test_request_flood_from_choked_peer_costs_nothing():
    a, b = pair(fast=False)
    for i in range(2000):
        a.receive_data(wire(Request(i % 11, 0, 1)), 0)
    assert a.statistics()["refused_requests"] == 2000 and a.incoming_requests() == []
    assert a.data_to_send() == b""


def test_magnet_core_checks_sizes_only_until_geometry_known():
    a, b = pair(geometry=None)
    a.receive_data(wire(Bitfield(b"\xff" * 1000)) + wire(Have(70000)), 0)
    assert len(drain(a)) == 2
    a.set_geometry(G)
    with pytest.raises(WireError):
        a.receive_data(wire(Have(11)), 0)


# ---- fuzzing -----------------------------------------------------------------------------

_msgs = st.sampled_from(ALL + [Request(0, 0, BLOCK_SIZE), Piece(0, 0, b"a"),
                               Bitfield(b"\xff\xe0"), Have(100)])


def _opened(fast: bool) -> PeerWire:
    a = PeerWire(now=0, geometry=G)
    a.send(Handshake.make(IH, b"A" * 20, fast=fast))
    a.receive_data(b"\x13BitTorrent protocol" + Handshake.make(IH, b"B" * 20, fast=fast).reserved
                   + IH + b"B" * 20, 0)
    drain(a)
    return a


def _run(core: PeerWire, chunks) -> tuple[list, Violation | None]:
    events = []
    try:
        for c in chunks:
            core.receive_data(c, 1.0)
            events.extend(drain(core))
    except WireError as exc:
        events.extend(drain(core))
        return [_norm(e) for e in events], exc.reason
    return [_norm(e) for e in events], None


def _norm(e):
    for attr in ("data", "payload"):
        if hasattr(e, attr):
            return (type(e).__name__, bytes(getattr(e, attr)),
                    tuple(getattr(e, f) for f in ("index", "begin", "ext_id", "msg_id", "name")
                          if hasattr(e, f)))
    return e


def _accepting(fast: bool) -> PeerWire:
    """An acceptor that has the peer's handshake and not yet confirmed."""
    a = PeerWire(now=0, geometry=G)
    a.receive_data(b"\x13BitTorrent protocol" + Handshake.make(IH, b"B" * 20, fast=fast).reserved
                   + IH + b"B" * 20, 0)
    drain(a)
    return a


def _run_accepting(fast: bool, chunks) -> tuple[list, Violation | None]:
    """Feed ``chunks`` before the acceptor confirms; the confirmation then
    parses what was held."""
    core = _accepting(fast)
    try:
        for c in chunks:
            core.receive_data(c, 1.0)
        core.send(Handshake.make(IH, b"A" * 20, fast=fast))
    except WireError as exc:
        return [_norm(e) for e in drain(core)], exc.reason
    return [_norm(e) for e in drain(core)], None


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300) | st.lists(_msgs, max_size=12).map(
    lambda ms: b"".join(wire(m) for m in ms)), st.booleans(), st.data())
def test_fuzz_core_any_input_parses_or_raises_and_chunking_is_invisible(data, fast, draw):
    whole, whole_err = _run(_opened(fast), [data] if data else [])
    split, split_err = _run(_opened(fast), [data[i:i + 1] for i in range(len(data))])
    cuts = sorted(draw.draw(st.lists(st.integers(0, len(data)), max_size=5)))
    pieces = [data[i:j] for i, j in zip([0] + cuts, cuts + [len(data)]) if j > i]
    chunked, chunked_err = _run(_opened(fast), pieces)
    assert whole == split == chunked
    assert whole_err == split_err == chunked_err
    # the same bytes held by an acceptor until it confirms: the same events
    held, held_err = _run_accepting(fast, pieces)
    assert (held, held_err) == (whole, whole_err)


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=100))
def test_fuzz_handshake_and_decoder(data):
    core = PeerWire(now=0)
    try:
        core.receive_data(data, 0)
    except RemoteProtocolError:
        assert core.state is ConnState.ERROR
    try:
        decode_message_untrusted(memoryview(data))
    except RemoteProtocolError:
        pass


def test_core_conforms_to_the_stream_core_contract():
    from _utpkit.contract import StreamCore
    assert isinstance(PeerWire(now=0), StreamCore)


_u32s = st.integers(0, (1 << 32) - 1)
_generated = st.one_of(
    st.builds(Have, _u32s), st.builds(Suggest, _u32s), st.builds(AllowedFast, _u32s),
    st.builds(Request, _u32s, _u32s, _u32s), st.builds(Cancel, _u32s, _u32s, _u32s),
    st.builds(Reject, _u32s, _u32s, _u32s), st.builds(Port, st.integers(0, 65535)),
    st.builds(Bitfield, st.binary(max_size=64)),
    st.builds(Piece, _u32s, _u32s, st.binary(min_size=1, max_size=BLOCK_SIZE)),
    st.builds(Extended, st.integers(1, 255), st.binary(max_size=200)),
    st.builds(ExtensionHandshake, st.dictionaries(st.text(min_size=1, max_size=12),
                                                  st.integers(0, 255), max_size=5),
              st.none() | st.text(max_size=20), st.none() | st.integers(1, 65535),
              st.none() | st.integers(1, 5000)),
    st.sampled_from([KeepAlive(), Choke(), Unchoke(), Interested(), NotInterested(),
                     HaveAll(), HaveNone()]))


@settings(max_examples=300, deadline=None)
@given(_generated)
def test_fuzz_codec_round_trips_every_message(msg):
    data = wire(msg)
    back = decode_message_untrusted(memoryview(data)[4:])
    assert _norm(back) == _norm(msg)
