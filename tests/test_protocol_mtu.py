"""Packet size: MTU probing with DONTFRAG and ICMP fragmentation-needed
(issue #2 §3 and §5).

When the application allows datagrams larger than the safe default
(``udp_mtu`` above 1402 bytes over IPv4), the engine starts at the default
and probes upward with datagrams flagged UTP_UDP_DONTFRAG; a path that
cannot carry one drops it (and may say so with an ICMP "fragmentation
needed" carrying the next hop's MTU, which routers have been seen to fill
with 0 and other nonsense).
"""

import pytest

import utp
from utp.testing import Network, transfer

MS = 1000
S = 1_000_000
MiB = 1 << 20

PROBE_GAP = 32      # the search stops within this many bytes of the ceiling
MIN_MTU = 296       # the engine's floor: a header, the longest SACK, payload
IP_UDP = 28


def setup(path_mtu=None, udp_mtu=9000, ipv6=False, options=None, **link):
    net = Network(seed=1)
    a = net.add_node("a", udp_mtu=udp_mtu, ipv6=ipv6, options=options)
    b = net.add_node("b", udp_mtu=udp_mtu, ipv6=ipv6, options=options)
    net.link(a, b, delay_us=10 * MS, bandwidth_bps=100e6, queue_bytes=500_000,
             mtu=path_mtu, **link)
    return net, a, b


def watch(link, icmp=None, path_mtu=None):
    """Log (time, size, flags) of every datagram on `link`.  With `icmp`,
    play the router: drop a DONTFRAG datagram larger than `path_mtu` and
    send its sender an ICMP fragmentation-needed with next-hop MTU `icmp`
    one link delay later."""
    log = []
    net, src, dst = link.net, link.src, link.dst

    def filt(now, data, flags):
        log.append((now, len(data), flags))
        if icmp is not None and len(data) > path_mtu and flags & utp.UTP_UDP_DONTFRAG:
            net.call_later(link.delay_us, lambda: src.call(
                src.ctx.process_icmp_fragmentation, data, dst.addr, icmp))
            return False
        return None
    link.filter = filt
    return log


def probes(log):
    return [n for _, n, f in log if f & utp.UTP_UDP_DONTFRAG]


def test_no_probing_at_the_default_size():
    net, a, b = setup(udp_mtu=None, path_mtu=1402, drop_fragments=True)
    log = watch(net.get_link(a, b))
    with net:
        r = transfer(net, a, b, 2 * MiB)
    assert r.ok
    assert probes(log) == []
    assert max(n for _, n, _ in log) == 1402 == r.a_stats["mtu_guess"]


@pytest.mark.parametrize("path_mtu", [1500, 4000, 8000])
def test_probing_finds_the_path_mtu(path_mtu):
    """No ICMP: DONTFRAG probes larger than the path are silently dropped
    (larger datagrams without the flag are fragmented and delivered); the
    binary search settles within PROBE_GAP bytes below the path MTU."""
    net, a, b = setup(path_mtu)
    ab = net.get_link(a, b)
    log = watch(ab)
    with net:
        r = transfer(net, a, b, 8 * MiB)
    assert r.ok and r.clean_close
    size = r.a_stats["mtu_guess"]
    assert path_mtu - PROBE_GAP <= size <= path_mtu
    assert ab.dropped_mtu >= 1
    # Once settled, full packets are the found size, and they get through.
    late = [n for t, n, f in log if t > r.elapsed_us * 0.8 and not f]
    assert max(late) == size
    # Probes were larger than 1402 and at most udp_mtu.
    assert all(1402 < n <= 9000 for n in probes(log))


def test_probing_up_to_udp_mtu_on_an_unlimited_path():
    net, a, b = setup(None, udp_mtu=6000)
    log = watch(net.get_link(a, b))
    with net:
        r = transfer(net, a, b, 8 * MiB)
    assert r.ok
    assert 6000 - PROBE_GAP <= r.a_stats["mtu_guess"] <= 6000
    assert max(probes(log)) <= 6000


def test_probing_over_ipv6():
    net, a, b = setup(3000, ipv6=True)
    with net:
        r = transfer(net, a, b, 8 * MiB)
    assert r.ok
    assert 3000 - PROBE_GAP <= r.a_stats["mtu_guess"] <= 3000


def test_probing_disabled_uses_udp_mtu():
    net, a, b = setup(None, udp_mtu=3000, options={utp.UTPKIT_MTU_PROBING: 0})
    log = watch(net.get_link(a, b))
    with net:
        r = transfer(net, a, b, 2 * MiB)
    assert r.ok
    assert probes(log) == []
    assert r.a_stats["mtu_guess"] == 3000


def test_icmp_with_the_true_next_hop_mtu():
    """The router reports the IP MTU of the next hop (UDP payload + 28 for
    IPv4); the engine caps its search there at once."""
    path = 4000
    net, a, b = setup()
    log = watch(net.get_link(a, b), icmp=path + IP_UDP, path_mtu=path)
    with net:
        r = transfer(net, a, b, 8 * MiB)
        assert a.ctx.stats()["icmp_handled"] == 1
    assert r.ok and r.clean_close
    assert path - PROBE_GAP <= r.a_stats["mtu_guess"] <= path
    # Only the first probe was too large; the search then stayed below.
    assert sum(1 for n in probes(log) if n > path) == 1


def test_simulated_router_icmp():
    """The simulator's own ICMP (Link icmp=True) -- it reports the link's
    UDP payload limit as the next-hop MTU, so the engine, which subtracts
    the IP and UDP headers, ends up to 28 bytes lower than it could."""
    path = 4000
    net, a, b = setup(path, icmp=True, drop_fragments=False)
    with net:
        r = transfer(net, a, b, 8 * MiB)
    assert r.ok
    assert path - IP_UDP - PROBE_GAP <= r.a_stats["mtu_guess"] <= path


@pytest.mark.parametrize("next_hop", [0, 1, 68, 296, 500, 576, 1280, 65535])
def test_icmp_with_odd_next_hop_values(next_hop):
    """Any next-hop value is taken without harm (libutp asserts on values
    below its floor): nonsense and tiny values fall back to a safe size, a
    value larger than the datagram the router refused is ignored, and the
    transfer completes."""
    path = 4000
    net, a, b = setup()
    log = watch(net.get_link(a, b), icmp=next_hop, path_mtu=path)
    with net:
        r = transfer(net, a, b, 4 * MiB)
        handled = a.ctx.stats()["icmp_handled"]
    assert r.ok and r.clean_close
    assert handled >= 1
    size = r.a_stats["mtu_guess"]
    assert MIN_MTU <= size <= path
    if next_hop - IP_UDP >= MIN_MTU and next_hop - IP_UDP < path:
        assert size <= next_hop - IP_UDP
    # The search did not keep knocking at the limit.
    assert sum(1 for n in probes(log) if n > path) <= 4


def test_icmp_for_unknown_or_garbled_datagrams_is_ignored():
    net, a, b = setup()
    with net:
        b.listen()
        ca = a.connect(b)
        assert net.run(S, condition=lambda: ca.connected_at is not None)
        ctx = a.ctx
        for quoted in (b"", b"\x01", b"\x41\x00", b"\x01\x00\x12\x34" + b"\x00" * 16,
                       b"\xff" * 40):
            for hop in (0, 68, 1500, 65535):
                assert a.call(ctx.process_icmp_fragmentation, quoted, b.addr, hop) is False
        assert a.call(ctx.process_icmp_fragmentation, b"\x01\x00\x12\x34", ("192.0.2.99", 1),
                      1500) is False
        assert ctx.stats()["icmp_handled"] == 0
        ca.send(100_000, shutdown=True)
        net.run(net.now + 5 * S)
        assert b.accepted[0].received == 100_000


@pytest.mark.parametrize("icmp", [False, True])
def test_probe_lost_on_a_path_that_drops_fragments(icmp):
    """An MTU black hole: the path carries 1500-byte datagrams and drops
    anything larger, fragmented or not (a common middlebox habit).  A probe
    that does not get through must be resent in packets the path carries."""
    net, a, b = setup(1500, drop_fragments=True, icmp=icmp)
    with net:
        r = transfer(net, a, b, 4 * MiB, timeout_us=120 * S)
    assert r.ok
    assert r.a_stats["mtu_guess"] <= 1500
