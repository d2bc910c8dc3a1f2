"""uTP connection setup and teardown on the simulated network (issue #2 §5).

Handshake, an acceptor that speaks first, both sides sending at once,
half-close, RESET, refusal, the SYN retransmission schedule and duplicate
SYNs.  Every time asserted here is exact: the links have fixed delays and no
jitter, so the protocol's own timers decide when things happen.
"""

import struct

import pytest

import utp
from utp.testing import Network, transfer

MS = 1000
S = 1_000_000

# BEP 29 packet types (high nibble of byte 0).
ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN = range(5)


def make(seed=1, a_opts=None, b_opts=None, **link):
    net = Network(seed=seed)
    a = net.add_node("a", options=a_opts)
    b = net.add_node("b", options=b_opts)
    net.link(a, b, **link)
    return net, a, b


def ptype(data):
    return data[0] >> 4


def record(link, log):
    """Record (time, type, datagram) of everything sent on `link`."""
    def filt(now, data, flags):
        log.append((now, ptype(data), data))
        return None
    link.filter = filt


def header(ptype_, conn_id, seq_nr, ack_nr, *, wnd=1 << 20, ts=0, ts_diff=0):
    return struct.pack(">BBHIIIHH", (ptype_ << 4) | 1, 0, conn_id, ts, ts_diff, wnd,
                       seq_nr, ack_nr)


def fields(data):
    """(type, conn_id, seq_nr, ack_nr) of a uTP datagram."""
    _, _, conn_id, _, _, _, seq, ack = struct.unpack(">BBHIIIHH", data[:20])
    return ptype(data), conn_id, seq, ack


def test_handshake_takes_one_round_trip():
    net, a, b = make(delay_us=10 * MS)
    log_ab, log_ba = [], []
    record(net.links[("a", "b")], log_ab)
    record(net.links[("b", "a")], log_ba)
    with net:
        b.listen()
        ca = a.connect(b)
        assert net.run(S, condition=lambda: ca.connected_at is not None)
        assert ca.connected_at == 20 * MS
        cb, = b.accepted
        assert cb.events[0] == (10 * MS, "accept", a.addr)
        assert cb.sock.peername == a.addr and ca.sock.peername == b.addr
        # SYN out at 0; its answer (a STATE acking the SYN) at 10 ms.
        syn = log_ab[0]
        assert (syn[0], syn[1]) == (0, ST_SYN)
        assert (log_ba[0][0], log_ba[0][1]) == (10 * MS, ST_STATE)
        # Connection ids as BEP 29 fixes them: the SYN carries the
        # initiator's receive id, the initiator sends with id + 1, the
        # acceptor sends with the id from the SYN.
        _, syn_id, syn_seq, _ = fields(syn[2])
        _, synack_id, _, synack_ack = fields(log_ba[0][2])
        assert synack_id == syn_id and synack_ack == syn_seq
        assert ca.sock.info()["state"] == utp.UTPKIT_SOCK_CONNECTED
        assert cb.sock.info()["state"] == utp.UTPKIT_SOCK_CONNECTED
        # A first message from the initiator carries conn id + 1.
        ca.send(data=b"x")
        net.run_for(50 * MS)
        data_pkts = [f for f in log_ab if f[1] == ST_DATA]
        assert fields(data_pkts[0][2])[1] == (syn_id + 1) & 0xFFFF
        assert cb.received == 1
        ca.close()
        cb.close()
        assert net.run(net.now + 10 * S, condition=lambda: ca.destroyed_at and cb.destroyed_at)
        assert ca.error is None and cb.error is None


def test_acceptor_sends_first():
    """Unlike libutp's, our acceptor may send before the initiator has sent
    a byte.  Its data waits for the initiator's confirming ACK (the third
    leg, sent on the SYN-ACK's arrival) -- data reaching an initiator that
    still waits for a lost SYN-ACK is taken by libtorrent for the SYN-ACK
    and its payload lost -- so it arrives two round trips after connect."""
    net, a, b = make(delay_us=10 * MS)
    log_ab = []
    record(net.links[("a", "b")], log_ab)
    greeting = b"hello from the acceptor" * 100
    got_at = []
    with net:
        b.listen(on_accept=lambda c: c.send(data=greeting, shutdown=True),
                 close_when_done=True)
        ca = a.connect(b, keep_data=True,
                       on_event=lambda c, kind, arg: got_at.append(net.now)
                       if kind == "eof" else None)
        assert net.run(5 * S, condition=lambda: ca.eof_at is not None)
        assert bytes(ca.data) == greeting
        assert ca.eof_at == got_at[0] == 40 * MS
        # Until then the initiator sent its SYN and nothing but ACKs.
        assert {t for _, t, _ in log_ab} <= {ST_SYN, ST_STATE}
        assert ca.written == 0
        ca.close()
        assert net.run(net.now + 10 * S,
                       condition=lambda: ca.destroyed_at and b.accepted[0].destroyed_at)


def test_both_sides_send_at_once():
    net, a, b = make(delay_us=15 * MS, bandwidth_bps=20e6, queue_bytes=200_000)
    a_msg = bytes(range(256)) * 400
    b_msg = bytes(reversed(range(256))) * 300
    with net:
        b.listen(on_accept=lambda c: c.send(data=b_msg, shutdown=True),
                 keep_data=True, close_when_done=True)
        ca = a.connect(b, keep_data=True, close_when_done=True)
        ca.send(data=a_msg, shutdown=True)  # queued before the connection is up
        assert net.run(30 * S, condition=lambda: ca.destroyed_at is not None
                       and b.accepted and b.accepted[0].destroyed_at is not None)
        cb, = b.accepted
        assert bytes(cb.data) == a_msg and bytes(ca.data) == b_msg
        assert ca.error is None and cb.error is None
        # Both data streams were under way in the same round trip.
        assert ca.stats()["nbytes_xmit"] >= len(a_msg)
        assert ca.final_stats["nbytes_recv"] == len(b_msg)


def test_both_directions_large_with_loss():
    net, a, b = make(seed=4, delay_us=20 * MS, bandwidth_bps=20e6, queue_bytes=150_000,
                     loss=0.02)
    with net:
        r = transfer(net, a, b, 2 << 20, both_directions=True)
        assert r.ok and r.clean_close
        assert r.conn_a.received_sha256 == r.conn_b.sent_sha256
        assert r.conn_b.received_sha256 == r.conn_a.sent_sha256


def test_half_close():
    """shutdown_write on one side: the other sees EOF and can still send
    back; then both close cleanly and both sockets are destroyed."""
    net, a, b = make(delay_us=10 * MS, bandwidth_bps=10e6, queue_bytes=100_000)
    with net:
        b.listen()
        ca = a.connect(b)
        ca.send(200_000, shutdown=True)
        assert net.run(10 * S, condition=lambda: b.accepted and b.accepted[0].eof_at is not None)
        cb, = b.accepted
        assert cb.received == 200_000 and cb.received_sha256 == ca.sent_sha256
        assert cb.sock.eof and not ca.sock.eof
        assert ca.write_shutdown and ca.eof_at is None
        with pytest.raises(utp.ClosedError):
            ca.sock.write(b"after shutdown")
        # The half-closed side still receives.
        net.run_for(2 * S)
        cb.send(300_000, shutdown=True)
        assert net.run(net.now + 10 * S, condition=lambda: ca.eof_at is not None)
        assert ca.received == 300_000 and ca.received_sha256 == cb.sent_sha256
        assert ca.eof_at > cb.eof_at
        assert ca.error is None and cb.error is None
        ca.close()
        cb.close()
        assert net.run(net.now + 10 * S,
                       condition=lambda: ca.destroyed_at is not None
                       and cb.destroyed_at is not None)
        assert [k for _, k, _ in ca.events] == ["connect", "eof", "destroyed"]
        assert [k for _, k, _ in cb.events] == ["accept", "eof", "destroyed"]
        assert a.ctx.stats()["sockets_live"] == 0 and b.ctx.stats()["sockets_live"] == 0
        # Closing took a round trip or so, not a timeout.
        assert ca.destroyed_at - ca.eof_at < 500 * MS


def test_close_both_at_once_frees_both_sockets():
    net, a, b = make(delay_us=10 * MS)
    with net:
        b.listen()
        ca = a.connect(b)
        assert net.run(S, condition=lambda: b.accepted and ca.connected_at)
        cb = b.accepted[0]
        ca.close()
        cb.close()
        assert net.run(net.now + 5 * S, condition=lambda: ca.destroyed_at and cb.destroyed_at)
        assert ca.error is None and cb.error is None
        assert a.ctx.stats()["sockets_live"] == b.ctx.stats()["sockets_live"] == 0


def _sniff_ids(net):
    """Record the connection ids each side puts on its packets."""
    ids = {}

    def keep(key):
        def filt(now, data, flags):
            ids.setdefault(key, fields(data)[1])
            return None
        return filt
    net.links[("a", "b")].filter = keep("a")
    net.links[("b", "a")].filter = keep("b")
    return ids


def test_reset_from_peer_gives_econnreset():
    net, a, b = make(delay_us=10 * MS)
    ids = _sniff_ids(net)
    with net:
        b.listen()
        ca = a.connect(b)
        ca.send(10_000)
        assert net.run(S, condition=lambda: b.accepted and b.accepted[0].received == 10_000)
        cb = b.accepted[0]
        before = a.ctx.stats()
        # A RESET with an id that is not the connection's changes nothing...
        b.send_raw(header(ST_RESET, (ids["b"] + 7) & 0xFFFF, 1, 0), a)
        net.run_for(100 * MS)
        assert ca.error is None
        assert a.ctx.stats()["drop_unknown"] == before["drop_unknown"] + 1
        # ...one with the right id from the peer's address ends it.
        sent_at = net.now
        b.send_raw(header(ST_RESET, ids["b"], 1, 0), a)
        assert net.run(net.now + S, condition=lambda: ca.error is not None)
        assert ca.error == utp.UTP_ECONNRESET
        assert ca.error_at == sent_at + 10 * MS
        assert net.run(net.now + S, condition=lambda: ca.destroyed_at is not None)
        cb.close()
        net.run_for(30 * S)


def test_data_to_a_forgotten_connection_is_reset():
    """The acceptor closes; once its FIN is acknowledged its socket is gone.
    The initiator, which only half-closed nothing, writes again: the
    acceptor's context knows no such connection and answers with a RESET,
    and the initiator reports ECONNRESET one round trip later."""
    net, a, b = make(delay_us=10 * MS)
    with net:
        b.listen()
        ca = a.connect(b)
        ca.send(5_000)
        assert net.run(S, condition=lambda: b.accepted and b.accepted[0].received == 5_000)
        cb = b.accepted[0]
        cb.close()
        assert net.run(net.now + 5 * S, condition=lambda: cb.destroyed_at is not None
                       and ca.eof_at is not None)
        assert b.ctx.stats()["sockets_live"] == 0
        before = b.ctx.stats()
        sent_at = net.now
        ca.send(5_000)
        assert net.run(net.now + 5 * S, condition=lambda: ca.error is not None)
        assert ca.error == utp.UTP_ECONNRESET
        assert ca.error_at == sent_at + 20 * MS
        st = b.ctx.stats()
        assert st["drop_unknown"] > before["drop_unknown"]
        # One RESET per packet that reached the forgotten connection.
        assert (st["resets_sent"] - before["resets_sent"]
                == st["drop_unknown"] - before["drop_unknown"])
        assert net.run(net.now + S, condition=lambda: ca.destroyed_at is not None)


def test_refused_without_listener_is_quick():
    net, a, b = make(delay_us=10 * MS)
    with net:
        ca = a.connect(b)
        assert net.run(20 * S, condition=lambda: ca.destroyed_at is not None)
        assert ca.error == utp.UTP_ECONNREFUSED
        # One round trip, far below the 1 s SYN timeout.
        assert ca.error_at == 20 * MS
        st = b.ctx.stats()
        assert st["syn_refused"] == 1 and st["resets_sent"] == 1
        assert a.ctx.stats()["sockets_live"] == 0


def test_refused_at_the_socket_cap():
    net, a, b = make(delay_us=5 * MS)
    with net:
        b.listen()
        b.ctx.max_sockets = 1
        first = a.connect(b)
        second = a.connect(b)
        assert net.run(5 * S, condition=lambda: second.error is not None)
        assert second.error == utp.UTP_ECONNREFUSED and second.error_at == 10 * MS
        assert first.connected_at == 10 * MS and first.error is None
        assert len(b.accepted) == 1
        assert b.ctx.stats()["syn_refused"] == 1


def syn_times(net, a, b):
    log = []

    def drop_all(now, data, flags):
        log.append((now, ptype(data)))
        return False
    net.links[("a", "b")].filter = drop_all
    b.listen()
    ca = a.connect(b)
    assert net.run(200 * S, condition=lambda: ca.destroyed_at is not None)
    # SYNs, then one RESET as the attempt is given up (it clears a
    # half-open socket at the peer, should one of the SYNs have arrived).
    assert [t for _, t in log][-1] == ST_RESET and {t for _, t in log[:-1]} == {ST_SYN}
    assert log[-1][0] == ca.error_at
    return [t for t, _ in log[:-1]], ca


def test_connect_timeout_schedule_defaults():
    net, a, b = make(delay_us=10 * MS)
    with net:
        assert a.ctx.get_option(utp.UTPKIT_SYN_TIMEOUT) == 1000
        assert a.ctx.get_option(utp.UTPKIT_SYN_RETRIES) == 3
        times, ca = syn_times(net, a, b)
        assert times == [0, 1 * S, 3 * S, 7 * S]
        assert ca.error == utp.UTP_ETIMEDOUT and ca.error_at == 15 * S
        assert [k for _, k, _ in ca.events] == ["error", "destroyed"]
        assert a.ctx.stats()["sockets_live"] == 0


@pytest.mark.parametrize("timeout_ms, retries, expect_syns, expect_error", [
    (250, 5, [0, 250, 750, 1750, 3750, 7750], 15_750),
    (2000, 1, [0, 2000], 6000),
    (100, 0, [0], 100),
])
def test_connect_timeout_schedule_options(timeout_ms, retries, expect_syns, expect_error):
    net, a, b = make(delay_us=10 * MS, a_opts={utp.UTPKIT_SYN_TIMEOUT: timeout_ms,
                                               utp.UTPKIT_SYN_RETRIES: retries})
    with net:
        times, ca = syn_times(net, a, b)
        assert times == [t * MS for t in expect_syns]
        assert ca.error == utp.UTP_ETIMEDOUT and ca.error_at == expect_error * MS


def test_lost_syn_is_retransmitted_on_schedule():
    net, a, b = make(delay_us=10 * MS)
    dropped = []

    def drop_two(now, data, flags):
        if len(dropped) < 2:
            dropped.append(now)
            return False
        return None
    net.links[("a", "b")].filter = drop_two
    with net:
        b.listen()
        ca = a.connect(b)
        assert net.run(20 * S, condition=lambda: ca.connected_at is not None)
        assert dropped == [0, 1 * S]
        assert ca.connected_at == 3 * S + 20 * MS
        # Karn: the SYN was sent three times, so its round trip gives no RTT
        # sample; the first data packets will.
        assert len(b.accepted) == 1
        ca.close()
        b.accepted[0].close()
        net.run_for(5 * S)


def test_duplicated_syn_makes_one_connection():
    """The network delivers the first SYN twice: the second is answered
    again and counted, and creates nothing."""
    net, a, b = make(delay_us=10 * MS)
    ab = net.links[("a", "b")]
    ab.configure(duplicate=1.0)
    with net:
        b.listen()
        ca = a.connect(b)
        ab.configure(duplicate=0.0)  # only the SYN went out duplicated
        assert ab.duplicated == 1
        assert net.run(S, condition=lambda: ca.connected_at is not None)
        net.run_for(100 * MS)
        st = b.ctx.stats()
        assert st["syn_duplicate"] == 1
        assert len(b.accepted) == 1 and st["sockets_live"] == 1
        # Two SYN-ACKs came back; the connection is one and works.
        assert net.links[("b", "a")].sent >= 2
        ca.send(100_000, shutdown=True)
        cb = b.accepted[0]
        cb.close_when_done = True
        ca.close_when_done = True
        cb.shutdown_write()
        assert net.run(net.now + 10 * S, condition=lambda: ca.destroyed_at and cb.destroyed_at)
        assert cb.received == 100_000 and cb.received_sha256 == ca.sent_sha256
        assert ca.error is None and cb.error is None


def test_retransmitted_syn_after_lost_synack_makes_one_connection():
    net, a, b = make(delay_us=10 * MS)
    lost = []

    def drop_first(now, data, flags):
        if not lost:
            lost.append((now, ptype(data)))
            return False
        return None
    net.links[("b", "a")].filter = drop_first
    with net:
        b.listen()
        ca = a.connect(b)
        assert net.run(10 * S, condition=lambda: ca.connected_at is not None)
        assert lost == [(10 * MS, ST_STATE)]
        # The SYN went again at 1 s; the acceptor answered it again.
        assert ca.connected_at == 1 * S + 20 * MS
        st = b.ctx.stats()
        assert st["syn_duplicate"] == 1 and len(b.accepted) == 1
        r = transfer(net, a, b, 64 * 1024)  # the context still accepts others
        assert r.ok
        assert len(b.accepted) == 2
        ca.close()
        b.accepted[0].close()
        net.run_for(5 * S)


def test_abandoned_attempt_resets_the_acceptors_half_open_socket():
    """Every SYN-ACK is lost; the initiator gives up and closes.  Its
    RESET (on the acceptor's receive id) clears the half-open socket at
    once instead of leaving it to time out: libutp-based peers such as
    Transmission refuse further connections from an address while one
    from it is half-open."""
    net, a, b = make(delay_us=10 * MS)
    net.links[("b", "a")].filter = lambda now, data, flags: False if ptype(data) == ST_STATE else None
    with net:
        b.listen()
        ca = a.connect(b)
        net.run_for(2500 * MS)
        assert ca.connected_at is None
        assert b.ctx.stats()["half_open"] == 1
        ca.close()
        net.run_for(100 * MS)
        assert a.ctx.stats()["syn_abandoned"] == 1
        st = b.ctx.stats()
        assert st["half_open"] == 0 and st["sockets_live"] == 0, st
        net.links[("b", "a")].filter = None
        r = transfer(net, a, b, 64 * 1024)   # the next attempt is accepted as new
        assert r.ok
