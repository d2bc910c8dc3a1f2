"""The Cython binding utp._utp, driven by hand on a virtual clock.

Two Contexts exchange datagrams through take_datagrams() -> process_udp();
nothing here opens a real socket.
"""

import gc
import ipaddress
import socket

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import utp
from utp import ClosedError, Context

A4 = ("192.0.2.1", 1111)
B4 = ("192.0.2.2", 2222)
A6 = ("2001:db8::1", 1111, 0, 0)
B6 = ("2001:db8::2", 2222, 0, 0)


class Pair:
    """Two virtual-time engines wired back to back with zero delay."""

    def __init__(self, a_addr=A4, b_addr=B4, **kw):
        self.a = Context(virtual_time=True, seed=1, **kw)
        self.b = Context(virtual_time=True, seed=2, **kw)
        self.a_addr, self.b_addr = a_addr, b_addr
        self.events = {self.a: [], self.b: []}
        self.wire = []  # (src ctx, datagram, flags)

    def pump(self, advance_us=0):
        """Advance both clocks, then move datagrams until both are quiet."""
        for c in (self.a, self.b):
            c.now_us = c.now_us + advance_us
            c.check_timeouts()
        moved = True
        while moved:
            moved = False
            for src, dst, src_addr in ((self.a, self.b, self.a_addr),
                                       (self.b, self.a, self.b_addr)):
                dgrams = src.take_datagrams()
                for data, addr, flags in dgrams:
                    moved = True
                    self.wire.append((src, data, flags))
                    assert dst.process_udp(data, src_addr)
                dst.issue_deferred_acks()
        for c in (self.a, self.b):
            self.events[c].extend(c.take_events())

    def kinds(self, ctx):
        return [k for k, _, _ in self.events[ctx]]

    def close(self):
        self.a.close()
        self.b.close()


@pytest.fixture
def pair():
    p = Pair()
    yield p
    p.close()


def connect(p):
    p.b.listening = True
    s = p.a.connect(p.b_addr)
    p.pump()
    accepted = [sock for kind, sock, _ in p.events[p.b] if kind == "accept"]
    assert len(accepted) == 1
    return s, accepted[0]


# ---- context lifecycle ---------------------------------------------------


def test_context_close_is_idempotent_and_final():
    ctx = Context()
    assert not ctx.closed
    assert ctx.next_timeout() is None  # no sockets, no timers
    ctx.close()
    ctx.close()
    assert ctx.closed
    assert "closed" in repr(ctx)
    for call in (ctx.take_events, ctx.take_datagrams, ctx.check_timeouts,
                 ctx.issue_deferred_acks, ctx.next_timeout, ctx.create_socket, ctx.stats):
        with pytest.raises(ClosedError, match="Context is closed"):
            call()
    with pytest.raises(ClosedError):
        ctx.process_udp(b"x" * 20, A4)
    with pytest.raises(ClosedError):
        ctx.connect(B4)


def test_unclosed_context_warns():
    ctx = Context()
    with pytest.warns(ResourceWarning, match="unclosed utp.Context"):
        del ctx
        gc.collect()


def test_constants_exported():
    assert utp.UTP_STATE_DESTROYING == 4
    assert utp.UTP_ETIMEDOUT == 2
    assert utp.UTP_SENDTO == 15
    assert utp.UTP_TARGET_DELAY == 21
    assert utp.UTP_ARRAY_SIZE == 22
    assert utp.UTPKIT_MIN_RTO == 100
    assert utp.UTPKIT_SOCK_DESTROYED == 5
    assert utp.UTPKIT_CLASS_TRACKER == 3
    assert utp.ERROR_NAMES[utp.UTP_ECONNRESET] == "UTP_ECONNRESET"
    assert set(utp.__all__) <= set(dir(utp))


def test_real_clock_is_monotonic_and_not_settable():
    ctx = Context()
    try:
        t1 = ctx.now_us
        t2 = ctx.now_us
        assert 0 < t1 <= t2
        with pytest.raises(ValueError, match="virtual_time"):
            ctx.now_us = t2 + 1
    finally:
        ctx.close()


def test_virtual_clock_only_moves_forward():
    ctx = Context(virtual_time=True)
    try:
        assert ctx.now_us == 0
        ctx.now_us = 5_000_000
        ctx.now_us = 5_000_000
        assert ctx.now_us == 5_000_000
        with pytest.raises(ValueError, match="backwards"):
            ctx.now_us = 4_999_999
        assert ctx.now_us == 5_000_000
    finally:
        ctx.close()


def test_udp_mtu_validated():
    with pytest.raises(ValueError, match="udp_mtu"):
        Context(udp_mtu=10)
    with pytest.raises(TypeError):
        Context(seed="x")


def test_socket_cannot_be_built_directly():
    with pytest.raises(TypeError):
        utp.Socket()


# ---- options --------------------------------------------------------------


def test_context_options():
    ctx = Context()
    try:
        ctx.set_option(utp.UTPKIT_MIN_RTO, 250)
        assert ctx.get_option(utp.UTPKIT_MIN_RTO) == 250
        ctx.set_option(utp.UTP_TARGET_DELAY, 50_000)
        assert ctx.get_option(utp.UTP_TARGET_DELAY) == 50_000
        ctx.max_sockets = 7
        assert ctx.max_sockets == 7
        assert ctx.get_option(utp.UTPKIT_MAX_SOCKETS) == 7
        with pytest.raises(ValueError, match="option"):
            ctx.set_option(9999, 1)
        with pytest.raises(ValueError, match="option"):
            ctx.get_option(9999)
    finally:
        ctx.close()


def test_socket_options(pair):
    s, _ = connect(pair)
    s.set_option(utp.UTP_SNDBUF, 200_000)
    assert s.get_option(utp.UTP_SNDBUF) == 200_000
    s.set_option(utp.UTP_RCVBUF, 300_000)
    assert s.get_option(utp.UTP_RCVBUF) == 300_000
    with pytest.raises(ValueError, match="option"):
        s.set_option(9999, 1)


# ---- addresses -------------------------------------------------------------


@pytest.mark.parametrize("bad", [
    ("example.com", 80),
    ("1.2.3", 80),
    ("1.2.3.4.5", 80),
    ("1.2.3.4", 70000),
    ("1.2.3.4", -1),
    ("1.2.3.4", "80"),
    ("::1", 80, 0),
    ("fe80::zz", 80, 0, 0),
    ("1.2.3.4\x00", 80),
    (b"1.2.3.4", 80),
    ["1.2.3.4", 80],
    "1.2.3.4:80",
])
def test_bad_addresses_raise_valueerror_naming_them(bad):
    ctx = Context()
    try:
        with pytest.raises(ValueError, match="invalid address"):
            ctx.connect(bad)
        with pytest.raises(ValueError, match="invalid address"):
            ctx.process_udp(b"\x41" + b"\0" * 19, bad)
        assert ctx.stats()["live_sockets"] == 0
    finally:
        ctx.close()


def test_non_utp_datagrams_are_returned():
    ctx = Context()
    try:
        assert ctx.process_udp(b"d1:ad2:id20:abcdefghij0123456789e1:q4:ping1:t2:aa1:y1:qe", A4) is False
        assert ctx.process_udp(b"hello", A4) is False
        assert ctx.process_udp(bytearray(b"\x00" * 40), A6) is False
        assert ctx.process_udp(b"", A4) is False
        assert ctx.stats()["not_utp"] >= 3
        assert ctx.process_icmp_error(b"junk", A4) is False
        assert ctx.process_icmp_fragmentation(b"junk", A4, 1200) is False
        assert ctx.take_events() == []
    finally:
        ctx.close()


def test_classify():
    assert utp.classify(b"d1:ad2:id20:abcdefghij0123456789ee") == utp.UTPKIT_CLASS_DHT
    assert utp.classify(b"hello") == utp.UTPKIT_CLASS_OTHER
    syn = bytes([0x41]) + b"\0" * 19
    assert utp.classify(syn) == utp.UTPKIT_CLASS_UTP


# ---- a connection by hand ----------------------------------------------------


def test_handshake_transfer_and_close(pair):
    a, b = pair.a, pair.b
    b.listening = True
    s = a.connect(pair.b_addr)
    assert s.peername == pair.b_addr
    assert not s.connected
    assert a.next_timeout() is not None  # the SYN retransmission timer
    pair.pump()
    assert pair.kinds(a) == ["connect"]
    kind, bs, peer = pair.events[b][0]
    assert kind == "accept" and peer == pair.a_addr and bs.peername == pair.a_addr
    assert s.connected and bs.connected

    payload = bytes(range(256)) * 40
    assert s.write(payload) == len(payload)
    pair.pump(1000)
    assert pair.kinds(b).count("readable") == 1
    assert bs.readable == len(payload)
    assert bs.read(100) == payload[:100]
    assert bs.read() == payload[100:]
    assert bs.read() == b""

    # Both directions, then FIN from a.
    assert bs.write(b"pong") == 4
    s.shutdown_write()
    pair.pump(1000)
    assert s.read() == b"pong"
    assert "eof" in pair.kinds(b) and bs.eof
    st = s.stats()
    assert st["nbytes_xmit"] >= len(payload)
    assert bs.stats()["nbytes_recv"] == len(payload)
    info = s.info()
    assert info["state"] == utp.UTPKIT_SOCK_CONNECTED
    assert info["packet_size"] <= utp.DEFAULT_MTU_IPV4
    assert len(s.get_delays()) == 3

    s.close()
    bs.close()
    s.close()  # idempotent
    assert s.closed
    for _ in range(100):
        pair.pump(10_000)
        if s.destroyed and bs.destroyed:
            break
    assert s.destroyed and bs.destroyed
    assert pair.kinds(a)[-1] == "destroyed"
    assert pair.kinds(b)[-1] == "destroyed"
    # Statistics survive destruction as a final snapshot.
    assert s.stats()["nbytes_xmit"] >= len(payload)
    assert s.info()["state"] == utp.UTPKIT_SOCK_DESTROYED
    assert a.stats()["live_sockets"] == 0
    assert a.stats()["sockets_freed"] == 1
    assert a.next_timeout() is None


def test_datagrams_respect_mtu(pair):
    s, bs = connect(pair)
    s.write(b"z" * 100_000)
    pair.pump(1000)
    sizes = [len(d) for src, d, _ in pair.wire if src is pair.a]
    assert max(sizes) <= utp.DEFAULT_MTU_IPV4
    assert bs.readable > 0


def test_udp_mtu_option_limits_packets():
    p = Pair(udp_mtu=600)
    try:
        s, bs = connect(p)
        s.write(b"z" * 50_000)
        p.pump(1000)
        assert max(len(d) for src, d, _ in p.wire if src is p.a) <= 600
    finally:
        p.close()


def test_ipv6_handshake_and_transfer():
    p = Pair(A6, B6)
    try:
        s, bs = connect(p)
        assert bs.peername == A6
        assert s.peername == B6
        s.write(b"x" * 20_000)
        p.pump(1000)
        assert bs.read() == b"x" * 20_000
        assert max(len(d) for src, d, _ in p.wire if src is p.a) <= utp.DEFAULT_MTU_IPV6
    finally:
        p.close()


def test_ipv6_two_tuple_and_scope():
    ctx = Context(virtual_time=True)
    try:
        s = ctx.connect(("2001:db8::9", 80))
        assert s.peername == ("2001:db8::9", 80, 0, 0)
        (data, addr, flags), = ctx.take_datagrams()
        assert addr == ("2001:db8::9", 80, 0, 0)
        s2 = ctx.connect(("fe80::1", 80, 0, 3))
        assert s2.peername == ("fe80::1", 80, 0, 3)
        s.close()
        s2.close()
    finally:
        ctx.close()


def test_same_seed_same_bytes():
    def syn(seed):
        ctx = Context(virtual_time=True, seed=seed)
        ctx.now_us = 123_456_789
        s = ctx.connect(B4)
        (data, addr, flags), = ctx.take_datagrams()
        s.close()
        ctx.close()
        return data

    assert syn(7) == syn(7)
    assert syn(7) != syn(8)


def test_not_listening_refuses():
    p = Pair()
    try:
        s = p.a.connect(p.b_addr)
        p.pump()
        assert "accept" not in p.kinds(p.b)
        assert p.b.stats()["syn_refused"] >= 1
        # The refusal is a RESET: the initiator learns at once.
        assert ("error", s, utp.UTP_ECONNREFUSED) in p.events[p.a] or s.error is not None
        s.close()
    finally:
        p.close()


def test_socket_cap_refuses_further_syns():
    p = Pair()
    try:
        p.b.listening = True
        p.b.max_sockets = 1
        s1 = p.a.connect(p.b_addr)
        p.pump()
        s2 = p.a.connect(p.b_addr)
        p.pump()
        assert p.kinds(p.b).count("accept") == 1
        assert s1.connected and not s2.connected
        assert p.b.stats()["syn_refused"] >= 1
        s1.close()
        s2.close()
    finally:
        p.close()


def test_extra_buffered_shrinks_advertised_window(pair):
    s, bs = connect(pair)
    rcvbuf = bs.get_option(utp.UTP_RCVBUF)
    bs.extra_buffered = rcvbuf // 2
    assert bs.extra_buffered == rcvbuf // 2
    s.write(b"q" * 3000)
    pair.pump(1000)
    assert s.info()["peer_wnd"] <= rcvbuf - rcvbuf // 2
    with pytest.raises(ValueError):
        bs.extra_buffered = -1


def test_readable_reported_once_per_drain(pair):
    s, bs = connect(pair)
    for _ in range(5):
        s.write(b"r" * 1000)
    pair.pump(1000)
    assert pair.kinds(pair.b).count("readable") == 1
    assert bs.readable == 5000


def test_unread_data_holds_window_until_read(pair):
    s, bs = connect(pair)
    bs.set_option(utp.UTP_RCVBUF, 20_000)
    s.write(b"w" * 200_000)
    for _ in range(20):
        pair.pump(10_000)
    held = bs.readable
    assert 0 < held <= 20_000 + 2 * utp.DEFAULT_MTU_IPV4
    got = bs.read()
    for _ in range(20):
        pair.pump(10_000)
        got += bs.read()
    assert len(got) + bs.readable > held


# ---- lifetimes -------------------------------------------------------------------


def test_unclosed_socket_warns_and_is_closed(pair):
    s, bs = connect(pair)
    pair.events[pair.a].clear()  # the "connect" event holds a reference
    with pytest.warns(ResourceWarning, match="unclosed utp.Socket"):
        del s
        gc.collect()
    for _ in range(50):
        pair.pump(10_000)
    # The engine socket was closed: the peer saw EOF or the socket went away.
    assert bs.eof or bs.destroyed or bs.error is not None
    assert pair.a.stats()["live_sockets"] == 0


def test_closed_socket_kept_alive_until_destroyed_event(pair):
    s, bs = connect(pair)
    s.userdata = marker = object()
    s.close()
    pair.events[pair.a].clear()
    del s
    gc.collect()
    seen = []
    for _ in range(50):
        pair.pump(10_000)
        seen = [sock for k, sock, _ in pair.events[pair.a] if k == "destroyed"]
        if seen:
            break
    assert len(seen) == 1 and seen[0].userdata is marker
    bs.close()


def test_use_after_close(pair):
    s, bs = connect(pair)
    s.close()
    with pytest.raises(ClosedError, match="socket is closed"):
        s.write(b"x")
    with pytest.raises(ClosedError, match="socket is closed"):
        s.read()
    with pytest.raises(ClosedError):
        s.connect(B4)
    with pytest.raises(ClosedError):
        s.shutdown_write()
    pair.a.close()
    with pytest.raises(ClosedError, match="Context is closed"):
        s.stats()
    with pytest.raises(ClosedError, match="Context is closed"):
        s.info()
    assert s.destroyed and s.closed
    pair.b.close()
    with pytest.raises(ClosedError, match="Context is closed"):
        bs.write(b"x")
    assert bs.destroyed


def test_destroyed_socket_raises_clear_error():
    p = Pair()
    try:
        s = p.a.connect(p.b_addr)  # b is not listening: refused, then closed
        p.pump()
        s.close()
        for _ in range(20):
            p.pump(10_000)
        assert s.destroyed
        with pytest.raises(ClosedError):
            s.write(b"x")
    finally:
        p.close()


def test_context_close_with_live_sockets(pair):
    s, bs = connect(pair)
    s.write(b"x" * 5000)
    pair.a.close()
    assert s.destroyed and s.closed
    assert s.readable == 0
    del s
    gc.collect()  # no warning for a socket whose context is gone
    pair.b.close()
    assert bs.destroyed


def test_connect_twice_is_refused(pair):
    s, bs = connect(pair)
    with pytest.raises(ValueError):
        s.connect(pair.b_addr)


def test_write_on_unconnected_socket():
    ctx = Context(virtual_time=True)
    try:
        s = ctx.create_socket()
        with pytest.raises(ValueError, match="never connected"):
            s.write(b"x")
        assert s.write(b"") == 0
        s.close()
    finally:
        ctx.close()


def test_socket_keeps_its_context_alive():
    s = Context(virtual_time=True).connect(B4)
    gc.collect()
    assert not s.closed
    assert s.write(b"queued before the handshake") > 0
    s.close()
    with pytest.warns(ResourceWarning, match="unclosed utp.Context"):
        del s
        gc.collect()


def test_dropped_socket_with_queued_events():
    """A Socket dropped while the engine still has undrained events for it:
    the events are discarded, its C record lives on until the engine is
    done with it, and nothing is touched after it was freed."""
    p = Pair()
    try:
        s, bs = connect(p)
        p.events[p.a].clear()
        bs.write(b"data for a socket nobody reads" * 100)
        for data, _, _ in p.b.take_datagrams():
            p.a.process_udp(data, p.b_addr)  # queues "readable" on a, not drained
        with pytest.warns(ResourceWarning):
            del s
            gc.collect()
        evs = p.a.take_events()
        assert evs == []  # the orphan's events are dropped
        for _ in range(100):
            p.pump(10_000)
        assert [k for k, _, _ in p.events[p.a]] == []
        assert p.a.stats()["live_sockets"] == 0
        bs.close()
        for _ in range(100):
            p.pump(10_000)
        assert bs.destroyed
    finally:
        p.close()


def test_accepted_socket_dropped_before_the_context_closes():
    p = Pair()
    try:
        p.b.listening = True
        s = p.a.connect(p.b_addr)
        for data, _, _ in p.a.take_datagrams():
            p.b.process_udp(data, p.a_addr)  # "accept" queued on b, never drained
        p.b.close()  # frees the accepted socket's record with the engine
        with pytest.raises(ClosedError):
            p.b.take_events()
        s.close()
    finally:
        p.close()


@settings(max_examples=200, deadline=None)
@given(ip=st.ip_addresses(), port=st.integers(0, 65535),
       flow=st.integers(0, 0xFFFFF), scope=st.integers(0, 0xFFFFFFFF))
def test_addresses_round_trip(ip, port, flow, scope):
    ctx = Context(virtual_time=True)
    try:
        # Spelled the way the socket module spells it (inet_ntop), which for
        # IPv4-mapped IPv6 addresses is not str(ipaddress.ip_address()).
        if ip.version == 4:
            addr = (str(ip), port)
            want = addr
        else:
            addr = (ip.exploded, port, flow, scope)
            want = (socket.inet_ntop(socket.AF_INET6, ip.packed), port, flow, scope)
        s = ctx.connect(addr)
        assert s.peername == want
        (data, to, flags), = ctx.take_datagrams()
        assert to == want
        assert ipaddress.ip_address(to[0]) == ip
        s.close()
    finally:
        ctx.close()


# ---- the firewall: asked before the engine answers a SYN ------------------


def _types_from(p, ctx):
    return [data[0] >> 4 for src, data, _ in p.wire if src is ctx]


def test_firewall_refuses_before_the_syn_ack(pair):
    p = pair
    p.b.listening = True
    asked = []

    def firewall(addr):
        asked.append(addr)
        return addr != p.a_addr
    p.b.firewall = firewall
    assert p.b.firewall is firewall
    s = p.a.connect(p.b_addr)
    p.pump()
    assert asked == [p.a_addr]
    # B answered with a RESET only: no SYN-ACK (ST_STATE), no socket, no
    # "accept" event; A got the refusal at once.
    assert _types_from(p, p.b) == [3]
    assert "accept" not in p.kinds(p.b)
    stats = p.b.stats()
    assert stats["live_sockets"] == 0 and stats["sockets_live"] == 0
    assert stats["syn_refused"] == 1
    assert (stats["firewall_calls"], stats["firewall_refused"], stats["firewall_errors"]) == (1, 1, 0)
    assert ("error", s, utp.UTP_ECONNREFUSED) in p.events[p.a]
    # Cleared: the engine decides alone again, and the same peer gets in.
    p.b.firewall = None
    connect(p)
    assert p.b.stats()["firewall_calls"] == 1


def test_firewall_exception_refuses_and_is_raised_after_the_datagram(pair):
    p = pair
    p.b.listening = True

    def boom(addr):
        raise KeyError("firewall broke")
    p.b.firewall = boom
    p.a.connect(p.b_addr)
    syn = [d for d, _addr, _flags in p.a.take_datagrams() if d[0] >> 4 == 4]
    assert len(syn) == 1
    with pytest.raises(KeyError, match="firewall broke"):
        p.b.process_udp(syn[0], p.a_addr)
    assert [d[0][0] >> 4 for d in p.b.take_datagrams()] == [3]
    assert p.b.take_events() == []
    assert p.b.stats()["firewall_errors"] == 1 and p.b.stats()["live_sockets"] == 0
    # Raised once only.
    p.pump()


def test_firewall_query_tells_a_cookie_syn_from_its_return(pair):
    # Past the half-open bounds (0 here) the SYN gets a stateless cookie:
    # the firewall is asked provisionally, then again for good when the
    # cookie comes back -- about the same SYN (its connection id).
    p = pair
    p.b.listening = True
    p.b.set_option(utp.UTPKIT_HALF_OPEN_MAX, 0)
    asked = []

    def firewall(addr):
        asked.append((addr, p.b.firewall_query))
        return True
    p.b.firewall = firewall
    assert p.b.firewall_query is None
    s, _accepted = connect(p)
    (a1, (stage1, id1)), (a2, (stage2, id2)) = asked
    assert (stage1, stage2) == ("cookie_syn", "cookie_return")
    assert a1 == a2 == p.a_addr and id1 == id2
    assert p.b.stats()["syn_cookies"] == 1 and p.b.stats()["cookie_accepted"] == 1
    # Without pressure: one question, and its yes creates the connection.
    p.b.set_option(utp.UTPKIT_HALF_OPEN_MAX, 64)
    asked.clear()
    p.a.connect(p.b_addr)
    p.pump()
    assert [q[0] for _, q in asked] == ["syn"]
    assert len([k for k, _, _ in p.events[p.b] if k == "accept"]) == 2
    assert p.b.firewall_query is None


def test_firewall_must_not_call_the_engine(pair):
    p = pair
    p.b.listening = True
    seen = []

    def reentrant(addr):
        try:
            p.b.connect(p.a_addr)
        except RuntimeError as exc:
            seen.append(str(exc))
        return True
    p.b.firewall = reentrant
    s, _accepted = connect(p)
    assert len(seen) == 1 and "must not call the engine" in seen[0]
    with pytest.raises(TypeError, match="callable"):
        p.b.firewall = 3
