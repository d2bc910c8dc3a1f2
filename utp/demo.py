"""``python -m utp.demo``: one uTP transfer over a simulated network.

Two engines on a virtual clock exchange 8 MiB over a 20 Mbit/s path with
40 ms round-trip time and 1% random loss in each direction (see
utp.testing).  Prints goodput, retransmissions, RTT and whether the
received bytes hash the same as the sent ones; exits 0 when they do.
Takes a few seconds of real time; nothing goes near a real network.
"""

from __future__ import annotations

import argparse
import sys
import time

from utp.testing import Network, transfer


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m utp.demo", description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=8.0, help="MiB to send (default 8)")
    p.add_argument("--mbit", type=float, default=20.0, help="bottleneck Mbit/s (default 20)")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time (default 40)")
    p.add_argument("--loss", type=float, default=0.01, help="loss per direction (default 0.01)")
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)

    nbytes = int(args.mib * (1 << 20))
    bw = args.mbit * 1e6
    one_way_us = int(args.rtt_ms * 1000 / 2)
    # A queue of one bandwidth-delay product: room for LEDBAT's 100 ms
    # target without it being the only thing that limits the queue.
    queue = max(int(bw / 8 * args.rtt_ms / 1000), 16 * 1500)
    t0 = time.perf_counter()
    with Network(seed=args.seed) as net:
        a = net.add_node("a")
        b = net.add_node("b")
        net.link(a, b, delay_us=one_way_us, bandwidth_bps=bw, queue_bytes=queue,
                 loss=args.loss)
        r = transfer(net, a, b, nbytes)
    wall = time.perf_counter() - t0
    print(f"transfer     {nbytes / (1 << 20):.1f} MiB over {args.mbit:g} Mbit/s, "
          f"{args.rtt_ms:g} ms RTT, {args.loss:.1%} loss (seed {args.seed})")
    print(f"elapsed      {r.elapsed_us / 1e6:.2f} s virtual ({wall:.2f} s real)")
    print(f"goodput      {r.goodput_bps / 1e6:.2f} Mbit/s "
          f"({r.goodput_bps / bw:.0%} of the link)")
    print(f"lost         {r.lost} datagrams on the links")
    print(f"retransmits  {r.rexmit} after timeouts, {r.fastrexmit} fast")
    print(f"rtt          {r.srtt_us / 1000:.1f} ms smoothed")
    same = r.conn_b is not None and r.conn_b.received_sha256 == r.conn_a.sent_sha256
    print(f"sha256       {'equal' if same else 'DIFFERENT'} "
          f"({r.conn_a.sent_sha256[:16]}...)")
    print(f"close        {'clean' if r.clean_close else 'NOT clean'}")
    return 0 if r.ok else 1


if __name__ == "__main__":
    sys.exit(main())
