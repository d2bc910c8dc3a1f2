"""The simulated network utp.testing: transfers, determinism, accounting."""

import pytest

import utp
from utp.testing import Network, PayloadSource, transfer

MiB = 1 << 20


def make(seed=1, **link):
    net = Network(seed=seed)
    a = net.add_node("a")
    b = net.add_node("b")
    net.link(a, b, **link)
    return net, a, b


def assert_counters_add_up(link):
    c = link.counters()
    assert c["sent"] + c["duplicated"] == (
        c["delivered"] + c["dropped_loss"] + c["dropped_queue"] + c["dropped_mtu"]
        + c["dropped_filter"] + c["in_flight"])
    assert c["dropped"] == (c["dropped_loss"] + c["dropped_queue"] + c["dropped_mtu"]
                            + c["dropped_filter"])
    assert c["in_flight"] >= 0


@pytest.mark.parametrize("loss", [0.0, 0.05])
def test_one_mib(loss):
    net, a, b = make(delay_us=20_000, bandwidth_bps=20e6, queue_bytes=100_000, loss=loss)
    with net:
        r = transfer(net, a, b, MiB)
        assert r.ok and r.complete and r.clean_close
        assert r.conn_b.received == MiB
        assert r.conn_b.received_sha256 == r.conn_a.sent_sha256
        assert 0 < r.goodput_bps <= 20e6
        # At least one RTT for the handshake and one for the data.
        assert r.elapsed_us >= 80_000
        if loss:
            assert r.a_to_b["dropped_loss"] > 0
            assert r.rexmit + r.fastrexmit > 0
        else:
            assert r.a_to_b["dropped_loss"] == 0
        for link in net.links.values():
            assert_counters_add_up(link)
            assert link.in_flight == 0


def test_both_directions_and_ipv6():
    with Network(seed=3) as net:
        a = net.add_node("a", ipv6=True)
        b = net.add_node("b", ipv6=True)
        assert a.addr[0].startswith("2001:db8::") and len(a.addr) == 4
        net.link(a, b, delay_us=5_000, bandwidth_bps=50e6, queue_bytes=200_000, loss=0.01)
        r = transfer(net, a, b, 256 * 1024, both_directions=True, keep_data=True)
        assert r.ok and r.clean_close
        assert r.conn_a.received == r.conn_b.received == 256 * 1024
        assert bytes(r.conn_b.data)[:8] == (0).to_bytes(8, "big")
        assert r.conn_b.sock.peername == a.addr


def result_fingerprint(seed):
    net, a, b = make(seed=seed, delay_us=15_000, bandwidth_bps=10e6, queue_bytes=60_000,
                     loss=0.03, duplicate=0.01, reorder=0.02, reorder_delay_us=5_000,
                     jitter_us=2_000)
    with net:
        r = transfer(net, a, b, MiB // 2)
        assert r.ok
        return (r.elapsed_us, r.rexmit, r.fastrexmit, r.lost, r.conn_a.sent_sha256,
                tuple(sorted(r.a_to_b.items())), tuple(sorted(r.b_to_a.items())),
                tuple(net.links[("a", "b")].queue_delays), net.now, net.events_run)


def test_same_seed_same_run():
    assert result_fingerprint(11) == result_fingerprint(11)


def test_other_seed_other_run():
    assert result_fingerprint(11) != result_fingerprint(12)


def test_counters_add_up_under_every_impairment():
    net, a, b = make(delay_us=10_000, bandwidth_bps=5e6, queue_bytes=30_000, loss=0.02,
                     duplicate=0.05, reorder=0.05, reorder_delay_us=3_000, jitter_us=3_000)
    with net:
        r = transfer(net, a, b, MiB // 2)
        assert r.ok
        ab = net.links[("a", "b")]
        assert ab.duplicated > 0 and ab.dropped_loss > 0 and ab.dropped_queue > 0
        assert ab.delivered == ab.sent + ab.duplicated - ab.dropped
        assert r.lost == r.a_to_b["dropped"] + r.b_to_a["dropped"]
        for link in net.links.values():
            assert_counters_add_up(link)


def test_queue_delay_bounded_by_queue_size():
    bw, q = 8e6, 50_000
    net, a, b = make(delay_us=10_000, bandwidth_bps=bw, queue_bytes=q)
    with net:
        r = transfer(net, a, b, MiB)
        assert r.ok
        ab = net.links[("a", "b")]
        assert len(ab.queue_delays) == ab.sent - ab.dropped_queue
        assert max(ab.queue_delays) <= q * 8e6 / bw
        # The bottleneck was busy most of the time the data was flowing.
        assert ab.busy_us / r.elapsed_us > 0.5


def test_unlimited_link_has_no_queue():
    net, a, b = make(delay_us=1_000)
    with net:
        r = transfer(net, a, b, 64 * 1024)
        assert r.ok
        assert net.links[("a", "b")].busy_us == 0
        assert net.links[("a", "b")].queue_delays == []


def test_filter_drops_first_syn_then_connects():
    net, a, b = make(delay_us=10_000)
    dropped = []

    def drop_first(now, data, flags):
        if not dropped:
            dropped.append(now)
            return False
        return None

    net.links[("a", "b")].filter = drop_first
    with net:
        b.listen()
        conn = a.connect(b)
        assert net.run(5_000_000, condition=lambda: conn.connected_at is not None)
        assert net.links[("a", "b")].dropped_filter == 1
        # The SYN is retransmitted after UTPKIT_SYN_TIMEOUT (1 s by default).
        assert conn.connected_at >= 1_000_000
        conn.close()


def test_run_until_condition_and_max_events():
    net, a, b = make(delay_us=10_000)
    with net:
        assert net.run(until=500) is True  # nothing to do: clock moves to `until`
        assert net.now == 500
        b.listen()
        conn = a.connect(b)
        assert net.run(max_events=1) is False
        assert net.run(10_000_000, condition=lambda: conn.connected_at is not None)
        assert conn.connected_at == 500 + 2 * 10_000
        assert b.accepted and b.accepted[0].events[0][1] == "accept"
        conn.close()
        b.accepted[0].close()
        assert net.run(net.now + 5_000_000, condition=lambda: conn.destroyed_at is not None)


def test_unroutable_and_raw_datagrams():
    net, a, b = make(delay_us=1_000)
    with net:
        a.send_raw(b"to nowhere", ("192.0.2.200", 1))
        assert net.unroutable == 1
        got = []
        b.on_raw = lambda data, src: got.append((data, src))
        a.send_raw(b"d1:q4:pinge", b)
        net.run()
        assert got == [(b"d1:q4:pinge", a.addr)]
        assert b.not_utp[0][1:] == (b"d1:q4:pinge", a.addr)


def test_connect_to_non_listener_is_refused():
    net, a, b = make(delay_us=1_000)
    with net:
        conn = a.connect(b)
        net.run(10_000_000, condition=lambda: conn.destroyed_at is not None)
        assert conn.error == utp.UTP_ECONNREFUSED
        assert conn.destroyed_at is not None


def test_engine_ack_timer_without_deferred_acks():
    net = Network(seed=5, deferred_acks=False)
    a = net.add_node("a")
    b = net.add_node("b")
    net.link(a, b, delay_us=10_000, bandwidth_bps=10e6, queue_bytes=50_000)
    with net:
        r = transfer(net, a, b, 256 * 1024)
        assert r.ok


def test_payload_source_is_deterministic_and_chunk_distinct():
    p1, p2 = PayloadSource(5, chunk=64), PayloadSource(5, chunk=64)
    s1 = p1.generate(1000)
    assert s1 == p2.generate(1000) and len(s1) == 1000
    assert s1[:64] != s1[64:128]
    assert PayloadSource(6, chunk=64).generate(1000) != s1


def test_node_addresses_unique():
    with Network() as net:
        nodes = [net.add_node() for _ in range(300)]
        assert len({n.addr for n in nodes}) == 300
        with pytest.raises(ValueError, match="taken"):
            net.add_node(addr=nodes[0].addr)


def test_link_mtu_fragments_and_icmp():
    net, a, b = make(delay_us=1_000, mtu=500)
    with net:
        ab = net.links[("a", "b")]
        a.send_raw(b"d" + b"x" * 599, b)  # too big, no DF: "fragmented", delivered
        a.send_raw(b"d" + b"x" * 399, b)
        a.send_raw(b"d" + b"x" * 599, b, flags=utp.UTP_UDP_DONTFRAG)  # dropped
        net.run()
        assert (ab.fragmented, ab.dropped_mtu, ab.delivered) == (1, 1, 2)
        ab.configure(drop_fragments=True, icmp=True)
        a.send_raw(b"d" + b"x" * 599, b)
        a.send_raw(b"d" + b"x" * 599, b, flags=utp.UTP_UDP_DONTFRAG)
        net.run()
        # The ICMP reaches a's engine, which matches it to no socket.
        assert (ab.fragmented, ab.dropped_mtu, ab.delivered) == (1, 3, 2)
        assert_counters_add_up(ab)
        with pytest.raises(TypeError, match="unknown link parameter"):
            ab.configure(bandwith_bps=1)
        with pytest.raises(ValueError, match="probability"):
            ab.configure(loss=1.5)


def test_every_samples_the_queue():
    net, a, b = make(delay_us=10_000, bandwidth_bps=10e6, queue_bytes=40_000)
    samples = []
    with net:
        link = net.links[("a", "b")]
        net.every(10_000, lambda: samples.append(link.queued_bytes), until=2_000_000)
        r = transfer(net, a, b, MiB // 2)
        assert r.ok
        assert 0 < max(samples) <= 40_000
        assert len(samples) <= 2_000_000 // 10_000 + 1


def test_acceptor_data_never_overtakes_a_lost_syn_ack():
    """The acceptor's SYN-ACK and its repeat are lost: its data waits until
    the initiator has the SYN-ACK (from the answer to its repeated SYN) and
    says so, so no DATA ever reaches an initiator still waiting for the
    SYN-ACK (libtorrent would take it for the SYN-ACK and lose its
    payload), and every byte arrives."""
    net, a, b = make(delay_us=10_000)
    dropped, ab_types = [], []

    def drop_first_two(now, data, flags):
        if len(dropped) < 2:
            dropped.append((now, data[0] >> 4))
            return False
        return None

    with net:
        net.links[("b", "a")].filter = drop_first_two
        net.links[("a", "b")].filter = lambda now, data, flags: ab_types.append(data[0] >> 4)
        b.listen(on_accept=lambda c: c.send(10_000, shutdown=True))
        ca = a.connect(b)
        net.run(60_000_000, condition=lambda: ca.eof_at is not None)
        # The SYN-ACK at 10 ms, its repeat after the acceptor's SYN timeout.
        assert dropped == [(10_000, 2), (1_010_000, 2)]
        assert ca.received == 10_000
        # The initiator sent SYNs until connected, then confirmed with an ACK.
        assert ab_types[:3] == [4, 4, 2]
