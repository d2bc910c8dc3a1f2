"""Bulk transfers and loss recovery on the simulated network (issue #2 §5).

1-64 MiB with sha256 equality at 0-20% loss, with reordering, duplication
and jitter, in both directions at once; more than 65,536 packets (the 16-bit
sequence numbers wrap); the engine's own ACK timer when nobody calls
issue_deferred_acks; and the efficiency of loss recovery at 5% loss.
"""

import pytest

import utp
from utp.testing import Network, transfer

MS = 1000
S = 1_000_000
KiB = 1024
MiB = 1 << 20


def run_transfer(nbytes, seed=1, *, both=False, a_kw=None, b_kw=None, net_kw=None, **link):
    net = Network(seed=seed, **(net_kw or {}))
    a = net.add_node("a", **(a_kw or {}))
    b = net.add_node("b", **(b_kw or {}))
    net.link(a, b, **link)
    with net:
        r = transfer(net, a, b, nbytes, both_directions=both)
    return r


def assert_delivered(r, both=False):
    assert r.ok and r.complete and r.clean_close
    assert r.conn_b.received == r.nbytes
    assert r.conn_b.received_sha256 == r.conn_a.sent_sha256
    if both:
        assert r.conn_a.received == r.nbytes
        assert r.conn_a.received_sha256 == r.conn_b.sent_sha256


def retransmissions(stats):
    return stats["rexmit"] + stats["fastrexmit"]


# 50 Mbit/s, 20 ms RTT, 250 kB of queue; loss in both directions (so ACKs
# are lost too).  Large sizes only where they run fast.
PATH = dict(delay_us=10 * MS, bandwidth_bps=50e6, queue_bytes=250_000)

MATRIX = [
    (1, 0.0), (4, 0.0), (16, 0.0), (64, 0.0),
    (1, 0.01), (16, 0.01),
    (1, 0.05), (16, 0.05), (64, 0.05),
    (1, 0.10), (8, 0.10),
    (1, 0.20), (4, 0.20),
]


@pytest.mark.parametrize("mib, loss", MATRIX, ids=[f"{m}MiB-{int(l * 100)}pct" for m, l in MATRIX])
def test_transfer_matrix(mib, loss):
    r = run_transfer(mib * MiB, seed=mib * 100 + int(loss * 100), loss=loss, **PATH)
    assert_delivered(r)
    lost_data = r.a_to_b["dropped"]
    rx = retransmissions(r.a_stats)
    if loss == 0:
        # Only slow start's queue overflow loses anything.
        assert r.a_to_b["dropped_loss"] == 0
        assert r.goodput_bps > 0.9 * 50e6 * 1382 / 1430 or mib < 16
    else:
        assert r.a_to_b["dropped_loss"] > 0
        # Every lost data packet is repaired; few that were not lost are
        # resent.  (The FIN or a keepalive may be among the lost.)
        assert rx >= lost_data - 2
        assert rx <= 1.3 * lost_data + 5
        assert r.a_stats["nxmit"] == r.a_to_b["sent"]


@pytest.mark.parametrize("loss, mib", [(0.0, 8), (0.05, 8), (0.20, 2)])
def test_reordering_duplication_and_jitter(loss, mib):
    r = run_transfer(mib * MiB, seed=7, loss=loss, duplicate=0.05, reorder=0.05,
                     reorder_delay_us=8 * MS, jitter_us=3 * MS, **PATH)
    assert_delivered(r)
    assert r.a_to_b["duplicated"] > 0
    # Duplicates reach the receiver and are recognised as such.
    assert r.b_stats["nduprecv"] >= r.a_to_b["duplicated"] * 0.9


@pytest.mark.parametrize("loss, mib", [(0.0, 16), (0.05, 8), (0.20, 2)])
def test_both_directions_at_once(loss, mib):
    link = dict(loss=loss, reorder=0.01, reorder_delay_us=5 * MS, **PATH)
    both = run_transfer(mib * MiB, seed=11, both=True, **link)
    assert_delivered(both, both=True)
    if loss == 0:
        # The two directions share nothing but the ACK path: both at once
        # take hardly longer than one alone on the same (in-order) links.
        # Measured: 1.13x in order; with this 1% / 5 ms reordering 1.47x
        # (both directions overflow their queues in slow start, and the
        # reordering tolerance learnt from it slows loss detection).
        in_order = dict(link, reorder=0.0)
        both_in_order = run_transfer(mib * MiB, seed=11, both=True, **in_order)
        one = run_transfer(mib * MiB, seed=11, **in_order)
        assert both_in_order.elapsed_us < 1.3 * one.elapsed_us


def test_reordering_is_not_loss():
    """1% of packets held back 5 ms (about 20 packets overtake each) on a
    50 Mbit/s, 20 ms RTT path.  Measured: goodput drops from 5.8 to
    1.8 MB/s, with 35 spurious retransmissions, each halving the window.
    RACK (RFC 8985) widens its reordering window when a retransmission
    proves spurious; the goodput should stay within 30% of the in-order case."""
    in_order = run_transfer(16 * MiB, seed=11, **PATH)
    reordered = run_transfer(16 * MiB, seed=11, reorder=0.01, reorder_delay_us=5 * MS, **PATH)
    assert_delivered(reordered)
    assert reordered.goodput_bps >= 0.7 * in_order.goodput_bps


def test_ipv6_transfer_with_loss():
    net = Network(seed=3)
    a = net.add_node("a", ipv6=True)
    b = net.add_node("b", ipv6=True)
    net.link(a, b, loss=0.05, **PATH)
    with net:
        r = transfer(net, a, b, 4 * MiB, both_directions=True)
    assert_delivered(r, both=True)
    assert r.a_stats["mtu_guess"] == utp.DEFAULT_MTU_IPV6


def _wrap_watch(link):
    """Counts DATA packets on `link` and how often their sequence numbers
    wrapped from 65535 to 0."""
    seen = {"data": 0, "wraps": 0, "prev": None}

    def filt(now, data, flags):
        if data[0] >> 4 == 0 and len(data) > 20:
            seq = int.from_bytes(data[16:18], "big")
            prev = seen["prev"]
            if prev is not None and seq < prev and prev - seq > 0x8000:
                seen["wraps"] += 1
            seen["prev"] = seq
            seen["data"] += 1
        return None
    link.filter = filt
    return seen


@pytest.mark.parametrize("loss", [0.0, 0.02])
def test_more_than_65536_packets(loss):
    """With 300-byte datagrams (280 bytes of payload), 20 MiB takes about
    75,000 packets, so the 16-bit sequence numbers wrap at least once; with
    loss, holes and their repairs straddle the wrap too."""
    net = Network(seed=21)
    a = net.add_node("a", udp_mtu=300)
    b = net.add_node("b", udp_mtu=300)
    net.link(a, b, delay_us=5 * MS, bandwidth_bps=100e6, queue_bytes=300_000, loss=loss)
    watch = _wrap_watch(net.get_link(a, b))
    with net:
        r = transfer(net, a, b, 20 * MiB)
    assert_delivered(r)
    assert r.a_stats["mtu_guess"] == 300
    assert r.a_stats["nxmit"] > 70_000
    assert watch["data"] > 65_536
    assert watch["wraps"] >= 1
    if loss:
        assert retransmissions(r.a_stats) >= r.a_to_b["dropped_loss"]


def test_ack_timer_without_issue_deferred_acks():
    """Network(deferred_acks=False): nobody calls issue_deferred_acks, so
    ACKs go out on the engine's own rules (every few full packets) and its
    ACK timer (UTPKIT_ACK_DELAY, 20 ms).  A transfer runs at nearly the
    speed it has with the per-batch flush."""
    link = dict(delay_us=5 * MS, bandwidth_bps=10e6, queue_bytes=1_000_000)
    with_flush = run_transfer(8 * MiB, seed=2, **link)
    timer_only = run_transfer(8 * MiB, seed=2, net_kw=dict(deferred_acks=False), **link)
    assert_delivered(with_flush)
    assert_delivered(timer_only)
    assert timer_only.goodput_bps >= 0.95 * with_flush.goodput_bps
    # Fewer ACKs, since nothing forces one per received batch.
    assert timer_only.b_to_a["sent"] < with_flush.b_to_a["sent"]


@pytest.mark.parametrize("delay_ms", [20, 5])
def test_ack_timer_fires_after_ack_delay(delay_ms):
    """A lone small packet, and nobody flushes deferred ACKs: its ACK leaves
    exactly UTPKIT_ACK_DELAY after it arrived."""
    opts = {utp.UTPKIT_ACK_DELAY: delay_ms} if delay_ms != 20 else None
    net = Network(seed=1, deferred_acks=False)
    a = net.add_node("a")
    b = net.add_node("b", options=opts)
    net.link(a, b, delay_us=10 * MS)
    acks = []

    def watch(now, data, flags):
        acks.append((now, data[0] >> 4))
        return None
    with net:
        b.listen()
        ca = a.connect(b)
        assert net.run(S, condition=lambda: ca.connected_at is not None)
        net.get_link(b, a).filter = watch
        t_send = net.now
        ca.send(data=b"ping")
        net.run(net.now + S, condition=lambda: len(acks) > 0)
        assert acks[0] == (t_send + 10 * MS + delay_ms * MS, 2)
        assert b.accepted[0].received == 4
        assert net.timer_spins == 0
        ca.close()
        b.accepted[0].close()
        net.run(net.now + 5 * S)


# --- loss recovery efficiency ---------------------------------------------------

def _lossy_vs_clean(delay_us, seed, nbytes=16 * MiB):
    link = dict(delay_us=delay_us, bandwidth_bps=10e6, queue_bytes=1_000_000)
    clean = run_transfer(nbytes, seed=seed, **link)
    lossy = run_transfer(nbytes, seed=seed, loss=0.05, **link)
    assert_delivered(clean)
    assert_delivered(lossy)
    return clean, lossy


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_five_percent_loss_efficiency(seed):
    """Issue #2: at 5% loss (both directions), retransmissions <= 1.3 x the
    data packets actually lost, and goodput >= 30% of the loss-free goodput
    on the same link: 10 Mbit/s, 10 ms RTT, 1 MB queue.  (At 50 ms RTT the
    ratio is ~23%, bounded by halving once per RTT and LEDBAT's 3000 B/RTT
    gain; `python -m utp.bench sim` reports it.)"""
    clean, lossy = _lossy_vs_clean(5 * MS, seed)
    lost = lossy.a_to_b["dropped"]     # data packets lost on the data path
    rx = retransmissions(lossy.a_stats)
    assert lost > 500
    assert lost <= rx <= 1.3 * lost
    assert lossy.goodput_bps >= 0.30 * clean.goodput_bps
    # Measured: 86-88% of loss-free, retransmissions == losses exactly;
    # these looser bounds catch a regression well before the issue's do.
    assert lossy.goodput_bps >= 0.6 * clean.goodput_bps
    assert rx <= 1.1 * lost


def test_five_percent_loss_at_50ms_rtt_recovers_every_loss_once():
    clean, lossy = _lossy_vs_clean(25 * MS, 1, nbytes=8 * MiB)
    lost = lossy.a_to_b["dropped"]
    rx = retransmissions(lossy.a_stats)
    assert lost <= rx <= 1.3 * lost
    # No collapse to the RTO: libutp moved 0.1-0.16 MB/s here.
    assert lossy.a_stats["rexmit"] <= 0.05 * rx
    assert lossy.goodput_bps >= 0.15 * clean.goodput_bps
