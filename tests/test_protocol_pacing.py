"""Paced sending (issue 12), on the virtual clock.

The engine spreads what the windows admit over the round trip instead of
sending it back to back, so a receiver with a small socket buffer is not
flooded; the pacer runs on the engine's own timer (``next_timeout`` says when
the next burst may go), so the sans-I/O design holds.  The links here have no
bandwidth limit, so a burst the engine emits arrives as a burst: what is
counted per instant is exactly what the engine sent at once.
"""

import collections
import struct

from utp.testing import Network, transfer

MiB = 1 << 20
# Packets (utp_internal.h, in units of 1400 bytes): bursts start at 32 and
# grow by a packet per loss-free window up to 64, one GSO batch.
BURST_START = 32
BURST_MAX = 64


def _data_seq(data):
    if len(data) >= 20 and data[0] >> 4 == 0 and data[0] & 15 == 1:
        return struct.unpack(">H", data[16:18])[0]
    return None


def _run(drop=None, nbytes=8 * MiB, seed=3):
    """A transfer over a 2 ms RTT path without rate limit; returns the
    transfer result and {time: data packets sent at that instant}."""
    net = Network(seed=seed)
    a = net.add_node("a")
    b = net.add_node("b")
    net.link(a, b, delay_us=1000)
    per_instant = collections.Counter()
    sent_at = []

    def watch(now, data, flags):
        seq = _data_seq(data)
        if seq is None:
            return None
        per_instant[now] += 1
        sent_at.append((now, seq))
        if drop is not None and drop(now, seq):
            return False
        return None
    net.get_link(a, b).filter = watch
    with net:
        r = transfer(net, a, b, nbytes)
    return r, per_instant, sent_at


def test_bursts_are_bounded_and_spread_over_the_rtt():
    r, per_instant, _ = _run()
    assert r.ok and r.clean_close, r
    # Without pacing the window (hundreds of packets once it has grown)
    # would leave in one instant whenever an ACK opens it.
    assert max(per_instant.values()) <= BURST_MAX, per_instant.most_common(3)
    # The window did grow well past one burst, so the bound is the pacer's.
    assert r.conn_a.final_info["cwnd"] > 4 * BURST_MAX * 1400
    # ... and the data went out in many separate instants.
    assert len(per_instant) > r.a_to_b["sent"] / BURST_MAX


def test_a_burst_loss_shrinks_the_burst():
    """Twenty packets in a row lost (as when a receiver's socket buffer
    fills) halve the pacing burst: for the next round trips nothing leaves
    in bursts as large as before."""
    state = {"first": None, "dropped": 0, "seen": 0}

    def drop(now, seq):
        # Once the connection is well under way, drop 20 consecutive new packets.
        state["seen"] += 1
        if state["first"] is None and state["seen"] > 2000:
            state["first"] = seq
        if state["first"] is not None and state["dropped"] < 20 and \
                (seq - state["first"]) & 0xFFFF < 20:
            state["dropped"] += 1
            return True
        return False

    r, per_instant, sent_at = _run(drop=drop)
    assert r.ok and r.clean_close, r
    assert state["dropped"] == 20
    loss_time = next(t for t, s in sent_at if s == state["first"])
    srtt = r.srtt_us
    before = [n for t, n in per_instant.items() if loss_time - 10 * srtt <= t < loss_time]
    after = [n for t, n in per_instant.items() if loss_time + 2 * srtt <= t < loss_time + 6 * srtt]
    assert before and after
    assert max(before) >= BURST_START, sorted(before)[-5:]
    assert max(after) <= max(before) // 2, (sorted(before)[-5:], sorted(after)[-5:])
    # Repaired by SACK, not by a timeout.
    assert r.a_stats["rexmit"] == 0 and r.a_stats["fastrexmit"] >= 20, r.a_stats


def test_the_pacer_runs_on_the_engines_timer():
    """While paced data waits, the engine reports a timer due within half a
    round trip (next_timeout), and data leaves when that timer runs -- not
    only when ACKs arrive."""
    net = Network(seed=5)
    a = net.add_node("a")
    b = net.add_node("b")
    net.link(a, b, delay_us=20_000)
    b.listen()
    ca = a.connect(b)
    ca.send(1000 * MiB)
    timer_sends = []
    pacing_waits = []
    orig = a._on_timer

    def on_timer(due):
        before = net.get_link(a, b).sent
        orig(due)
        if net.get_link(a, b).sent > before:
            timer_sends.append(net.now)
    a._on_timer = on_timer

    def sample():
        # The sender receives no data, so no ACK of its own is pending; with
        # no loss the only timers are the pacer's and the loss probes (two
        # round trips and more).
        nt = a.ctx.next_timeout()
        info = ca.sock.info()
        if nt is not None and info["srtt_us"] and nt < info["srtt_us"] // 2:
            pacing_waits.append(nt)
    net.every(1000, sample, until=net.now + 1_000_000)
    with net:
        net.run(net.now + 1_000_000)
        info = ca.sock.info()
        assert info["cwnd"] > BURST_MAX * 1400
    assert len(pacing_waits) > 20, len(pacing_waits)
    # Many sends were started by the timer, spread over the run.
    assert len(timer_sends) > 20, len(timer_sends)
