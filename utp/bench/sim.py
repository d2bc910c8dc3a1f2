"""``python -m utp.bench sim``: the engine over the simulated network.

The scenarios of the protocol tests (tests/test_protocol_*.py), measured
instead of asserted, so that one version of the engine can be compared with
the next:

- bulk transfers on a 10 Mbit/s link at 10 and 50 ms RTT, loss-free and at
  1, 5, 10 and 20% random loss (both directions, so ACKs are lost too);
- a 100 Mbit/s path, reordering, the ACK timer without deferred-ACK flushes;
- our sender to receivers that acknowledge like libutp and like libtorrent
  (utp.simpeers), each behind a 208 KiB socket buffer with a reader of
  finite speed, side by side with our own receiver behind the same buffer
  (loss-free at 1 Gbit/s, and 2% loss at 100 Mbit/s); with RTO counts;
- LEDBAT: one, two and three bulk flows through a 10 Mbit/s bottleneck with
  50 ms RTT and a 1 MB drop-tail queue, measured over the second half of a
  60 s run.

Columns: goodput (application bytes per second) in MB/s and as a share of
the link rate; for lossy runs, as a share of the loss-free goodput on the
same link; retransmissions (timeout + fast) against the data packets the
link dropped; the bottleneck queue's median and 90th-percentile queueing
delay; virtual and real time.  Everything is seeded: the same engine gives
the same numbers, except the real time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import utp
from utp.simpeers import ModelReceiver, transfer_to_peer
from utp.testing import Network, transfer

MS = 1000
S = 1_000_000
MiB = 1 << 20

IP_UDP = 28                 # IPv4 + UDP header bytes per datagram
PACKET = 1402               # default UDP payload of a full packet (IPv4)
PAYLOAD = PACKET - 20       # minus the uTP header


@dataclass
class Row:
    group: str
    scenario: str
    link: str
    goodput: float                      # bytes per second (sum over flows)
    link_share: float                   # goodput * 8 / link rate
    vs_clean: float | None = None       # goodput / loss-free goodput, same link
    retransmitted: int | None = None
    lost: int | None = None
    q_median_ms: float | None = None
    q_p90_ms: float | None = None
    virtual_s: float = 0.0
    real_s: float = 0.0
    flows: list[float] = field(default_factory=list)   # per-flow goodput, B/s
    extra: dict[str, Any] = field(default_factory=dict)


def _pct(values: list[int], p: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return float(values[min(len(values) - 1, int(p * len(values)))])


def _link_name(rate: float, rtt_ms: float, queue: int | None) -> str:
    q = f", {queue // 1000} kB queue" if queue else ""
    return f"{rate / 1e6:g} Mbit/s, {rtt_ms:g} ms RTT{q}"


def run_transfer(group: str, scenario: str, *, rate: float, rtt_ms: float, nbytes: int,
                 loss: float = 0.0, queue: int = 1_000_000, seed: int = 1,
                 deferred_acks: bool = True, **link: Any) -> Row:
    t0 = time.perf_counter()
    net = Network(seed=seed, deferred_acks=deferred_acks)
    a = net.add_node("a")
    b = net.add_node("b")
    net.link(a, b, delay_us=int(rtt_ms * MS / 2), bandwidth_bps=rate, queue_bytes=queue,
             loss=loss, **link)
    with net:
        r = transfer(net, a, b, nbytes)
    if not r.ok:
        raise RuntimeError(f"{scenario}: transfer failed: {r}")
    delays = net.links[("a", "b")].queue_delays
    return Row(
        group=group, scenario=scenario, link=_link_name(rate, rtt_ms, queue),
        goodput=nbytes / (r.elapsed_us / S), link_share=r.goodput_bps / rate,
        retransmitted=r.a_stats["rexmit"] + r.a_stats["fastrexmit"],
        lost=int(r.a_to_b["dropped"]),
        q_median_ms=statistics.median(delays) / MS if delays else 0.0,
        q_p90_ms=_pct(delays, 0.9) / MS if delays else 0.0,
        virtual_s=r.elapsed_us / S, real_s=time.perf_counter() - t0,
        extra={"nbytes": nbytes, "loss": loss, "timeouts": r.a_stats["rexmit"],
               "acks": int(r.b_to_a["sent"])},
    )


def run_ledbat(flows: int, *, seconds: int = 60, rate: float = 10e6, rtt_ms: float = 50,
               queue: int = 1_000_000, seed: int = 1, target_us: int | None = None) -> Row:
    t0 = time.perf_counter()
    opts = {utp.Option.TARGET_DELAY: target_us} if target_us else None
    net = Network(seed=seed)
    a = net.add_node("a", options=opts)
    b = net.add_node("b", options=opts)
    net.link(a, b, delay_us=int(rtt_ms * MS / 2), bandwidth_bps=rate, queue_bytes=queue)
    link = net.get_link(a, b)
    b.listen()
    conns = [a.connect(b) for _ in range(flows)]
    for c in conns:
        c.send(10_000 * MiB)
    run_us, half_us = seconds * S, seconds * S // 2
    mark: dict[str, Any] = {}

    def take_mark() -> None:
        mark.update(n=len(link.queue_delays), bytes=link.bytes_delivered, pkts=link.delivered,
                    rx=[c.received for c in b.accepted])
    net.call_at(half_us, take_mark)
    with net:
        net.run(run_us)
        secs = (run_us - half_us) / S
        per_flow = [(c.received - r0) / secs for c, r0 in zip(b.accepted, mark["rx"])]
        wire = (link.bytes_delivered - mark["bytes"]) + IP_UDP * (link.delivered - mark["pkts"])
        delays = link.queue_delays[mark["n"]:]
        whole = [c.received / (run_us / S) for c in b.accepted]
        errors = [c.error for c in conns + b.accepted if c.error is not None]
    total = sum(per_flow)
    capacity = rate / 8 * PAYLOAD / (PACKET + IP_UDP)
    name = f"{flows} flow{'s' if flows > 1 else ''}"
    if target_us:
        name += f", target {target_us // MS} ms"
    return Row(
        group="ledbat", scenario=name, link=_link_name(rate, rtt_ms, queue),
        goodput=total, link_share=wire * 8 / secs / rate,
        lost=link.dropped,
        q_median_ms=statistics.median(delays) / MS, q_p90_ms=_pct(delays, 0.9) / MS,
        virtual_s=seconds, real_s=time.perf_counter() - t0, flows=per_flow,
        extra={"goodput_vs_full_packets": total / capacity,
               "q_p10_ms": _pct(delays, 0.1) / MS,
               "fairness_min_over_max": min(per_flow) / max(per_flow),
               "whole_run_flows": whole, "errors": errors},
    )


# Our sender into receivers of other stacks (utp.simpeers) behind a stock
# 208 KiB socket buffer whose reader drains at most 100 MB/s in 1 ms batches,
# on a path that is faster than the reader (1 Gbit/s, 1 ms RTT): the setting
# of issue 12, where bursts overflow the receiver's socket.
PEER_LINK = dict(delay_us=500, bandwidth_bps=1e9, queue_bytes=1_000_000)
PEER_SOCKBUF = dict(capacity=212_992, read_rate=100e6, interval_us=1000)


def run_peer(receiver: str, *, nbytes: int, loss: float = 0.0, seed: int = 1,
             link: dict[str, Any] | None = None) -> Row:
    """One transfer from our engine to `receiver` ("ours", "libutp" or
    "libtorrent"), all behind the same socket-buffer model on the same link."""
    t0 = time.perf_counter()
    link = dict(link or PEER_LINK, loss=loss)
    net = Network(seed=seed)
    a = net.add_node("a")
    with net:
        if receiver == "ours":
            b = net.add_node("b")
            net.link(a, b, **link)
            sb = b.set_socket_buffer(**PEER_SOCKBUF)
            r = transfer(net, a, b, nbytes)
            ok, elapsed, stats = r.ok, r.elapsed_us, r.a_stats
            info = r.conn_a.final_info or {}
            timeouts, drops, sacks = info.get("timeouts", 0), sb.dropped, "full"
            lost = int(r.a_to_b["dropped"])
        else:
            peer = ModelReceiver(net, "p", receiver, socket_buffer=PEER_SOCKBUF)
            net.link(a, peer, **link)
            pr = transfer_to_peer(net, a, peer, nbytes)
            ok, elapsed, stats, timeouts = pr.ok, pr.elapsed_us, pr.sender, pr.timeouts
            drops, lost = pr.socket_buffer["dropped"], int(pr.a_to_peer["dropped"])
            lengths = sorted(pr.sack_lengths)
            sacks = (f"{len(lengths)} lengths {lengths[0]}..{lengths[-1]} B, "
                     f"{sum(n for k, n in pr.sack_lengths.items() if k % 4)} odd"
                     if lengths else "none")
    if not ok:
        raise RuntimeError(f"transfer to {receiver} failed")
    label = "loss-free" if loss == 0 else f"{loss:.0%} loss"
    return Row(
        group=f"peers@{label}", scenario=receiver, link=_link_name(link["bandwidth_bps"],
                                                                   2 * link["delay_us"] / MS,
                                                                   link["queue_bytes"]),
        goodput=nbytes / (elapsed / S), link_share=nbytes * 8 / (elapsed / S) / link["bandwidth_bps"],
        retransmitted=stats["rexmit"] + stats["fastrexmit"], lost=lost + drops,
        virtual_s=elapsed / S, real_s=time.perf_counter() - t0,
        extra={"nbytes": nbytes, "timeouts": timeouts, "rto_rexmit": stats["rexmit"],
               "sockbuf_drops": drops, "sacks": sacks, "loss": loss},
    )


def scenarios(quick: bool) -> list[tuple[str, Any]]:
    """(description, thunk) for every run, in print order."""
    size = 4 * MiB if quick else 8 * MiB
    out: list[tuple[str, Any]] = []
    for rtt in (10, 50):
        for loss in (0.0, 0.01, 0.05, 0.10, 0.20):
            label = "loss-free" if loss == 0 else f"{loss:.0%} loss"
            out.append((f"transfer {rtt} ms {label}", lambda rtt=rtt, loss=loss, label=label:
                        run_transfer(f"transfers@{rtt}", label, rate=10e6,
                                     rtt_ms=rtt, nbytes=size, loss=loss)))
    big = 16 * MiB if quick else 64 * MiB
    out.append(("fast path", lambda: run_transfer(
        "other", f"{big // MiB} MiB loss-free", rate=100e6, rtt_ms=20, nbytes=big,
        queue=500_000)))
    out.append(("fast path 1%", lambda: run_transfer(
        "other", f"{big // MiB} MiB 1% loss", rate=100e6, rtt_ms=20, nbytes=big,
        queue=500_000, loss=0.01)))
    out.append(("in order", lambda: run_transfer(
        "other", "in order (reference)", rate=50e6, rtt_ms=20, nbytes=16 * MiB,
        queue=250_000)))
    out.append(("reordering", lambda: run_transfer(
        "other", "1% reordered by 5 ms", rate=50e6, rtt_ms=20, nbytes=16 * MiB,
        queue=250_000, reorder=0.01, reorder_delay_us=5 * MS)))
    out.append(("ack timer", lambda: run_transfer(
        "other", "ACK timer only (no flushes)", rate=10e6, rtt_ms=10, nbytes=size,
        deferred_acks=False)))
    peer_bytes = 16 * MiB if quick else 64 * MiB
    for receiver in ("ours", "libutp", "libtorrent"):
        out.append((f"peers {receiver} loss-free", lambda receiver=receiver: run_peer(
            receiver, nbytes=peer_bytes)))
    lossy = dict(delay_us=5 * MS, bandwidth_bps=100e6, queue_bytes=500_000)
    for receiver in ("ours", "libutp", "libtorrent"):
        out.append((f"peers {receiver} 2% loss", lambda receiver=receiver: run_peer(
            receiver, nbytes=peer_bytes // 4, loss=0.02, link=lossy)))
    seconds = 30 if quick else 60
    for flows in (1, 2, 3):
        out.append((f"ledbat {flows}", lambda flows=flows: run_ledbat(flows, seconds=seconds)))
    out.append(("ledbat target 50", lambda: run_ledbat(1, seconds=seconds, target_us=50 * MS)))
    return out


def _fill_vs_clean(rows: list[Row]) -> None:
    clean: dict[str, float] = {}
    for row in rows:
        if row.group.startswith("transfers@") and row.extra.get("loss") == 0.0:
            clean[row.group] = row.goodput
    for row in rows:
        if row.group in clean and row.extra.get("loss"):
            row.vs_clean = row.goodput / clean[row.group]
    # Peers: each receiver against our own on the same link ("%clean" column
    # reads "%ours" there).
    ours = {row.group: row.goodput for row in rows
            if row.group.startswith("peers@") and row.scenario == "ours"}
    for row in rows:
        if row.group in ours:
            row.vs_clean = row.goodput / ours[row.group]


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def render(rows: list[Row]) -> str:
    lines: list[str] = []
    group = None
    head = (f"  {'scenario':30} {'MB/s':>7} {'%link':>6} {'%clean':>6} {'rexmit/lost':>13}"
            f" {'q med/p90 ms':>13} {'virt s':>7} {'real s':>6}")
    for row in rows:
        if row.group != group:
            group = row.group
            lines.append("")
            title = group.split("@")[0]
            if title == "peers":
                title = (f"our sender to other stacks' receivers ({group.split('@')[1]}; "
                         f"208 KiB socket buffer, reader 100 MB/s in 1 ms batches; "
                         f"%clean: of our own receiver)")
            lines.append(f"{title} -- {row.link}" if group != "other" else "other scenarios")
            lines.append(head)
        rx = "-" if row.retransmitted is None else f"{row.retransmitted}/{row.lost}"
        if row.group == "ledbat":
            rx = f"drops {row.lost}"
        q = ("-" if row.q_median_ms is None
             else f"{row.q_median_ms:.1f}/{row.q_p90_ms:.1f}")
        lines.append(f"  {row.scenario:30} {row.goodput / 1e6:7.3f} {row.link_share:6.1%}"
                     f" {_fmt(row.vs_clean, '6.1%'):>6} {rx:>13} {q:>13}"
                     f" {row.virtual_s:7.1f} {row.real_s:6.2f}"
                     + (f"  [{row.link}]" if group == "other" else ""))
        if row.group.startswith("peers@"):
            lines.append(f"  {'':30} RTOs {row.extra['timeouts']}, retransmitted after a timeout "
                         f"{row.extra['rto_rexmit']}, receiver socket drops "
                         f"{row.extra['sockbuf_drops']}; SACKs: {row.extra['sacks']}")
        if row.group == "ledbat":
            flows = " / ".join(f"{f / 1e6:.3f}" for f in row.flows)
            lines.append(f"  {'':30} flows {flows} MB/s (second half), min/max "
                         f"{row.extra['fairness_min_over_max']:.2f}; "
                         f"{row.extra['goodput_vs_full_packets']:.1%} of full-packet "
                         f"capacity; q p10 {row.extra['q_p10_ms']:.1f} ms")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="utp-bench sim",
        description="Run the uTP engine over the simulated network and print goodput, "
                    "retransmissions against losses and queueing delay.  Nothing is sent "
                    "on a real network.")
    ap.add_argument("--quick", action="store_true",
                    help="smaller transfers and 30 s LEDBAT runs (about half the time)")
    ap.add_argument("--json", action="store_true", help="print one JSON object per run")
    ap.add_argument("-k", metavar="TEXT", default="",
                    help="only runs whose description contains TEXT "
                         "(e.g. ledbat, transfer, '50 ms', reordering)")
    args = ap.parse_args(argv)

    t0 = time.perf_counter()
    progress = not args.json and sys.stderr.isatty()
    rows: list[Row] = []
    for desc, thunk in scenarios(args.quick):
        if args.k and args.k not in desc:
            continue
        rows.append(thunk())
        if progress:
            print(f"\r{len(rows)} runs, {time.perf_counter() - t0:.1f} s ...", end="",
                  file=sys.stderr, flush=True)
    _fill_vs_clean(rows)
    if progress:
        print("\r\033[K", end="", file=sys.stderr, flush=True)
    if args.json:
        for row in rows:
            print(json.dumps(asdict(row)))
        return 0
    print(f"utp.bench sim: {len(rows)} runs in {time.perf_counter() - t0:.1f} s real time "
          f"(virtual time, seeded; loss applies to both directions)")
    print(render(rows))
    print()
    print("MB/s: application bytes per second (1e6).  %link: of the link rate.  "
          "%clean: of the loss-free run on the same link.\nrexmit/lost: retransmitted "
          "packets (timeout + fast) / data packets the link dropped.  q: queueing "
          "delay at the bottleneck.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
