"""``utp-demo`` (or ``python -m utp.demo``): uTP transfers, for real and simulated.

First 64 MiB between two Endpoints over real UDP sockets on 127.0.0.1 (the
trio layer and the batched syscalls); then 8 MiB between two engines on a
virtual clock over a simulated 20 Mbit/s path with 40 ms round-trip time and
1% random loss in each direction (see utp.testing).  Prints throughput,
retransmissions, RTT and whether the received bytes hash the same as the
sent ones; exits 0 when both do.  Nothing leaves this machine.
"""

from __future__ import annotations

import argparse
import sys
import time

import hashlib
import os

from utp.testing import Network, transfer


def loopback(nbytes: int) -> bool:
    """nbytes over real UDP on 127.0.0.1; True when the hashes match."""
    import trio

    import utp

    async def main() -> bool:
        async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.1", 0) as b:
            listener = b.listen()
            block = os.urandom(1 << 20)
            sent, got = hashlib.sha256(), hashlib.sha256()
            t0 = time.perf_counter()
            stream = await a.connect(b.local_address)
            peer = await listener.accept()

            async def send() -> None:
                left = nbytes
                while left > 0:
                    chunk = block[:min(left, len(block))]
                    await stream.send_all(chunk)
                    sent.update(chunk)
                    left -= len(chunk)
                await stream.send_eof()

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                async for chunk in peer:
                    got.update(chunk)
            elapsed = time.perf_counter() - t0
            st = stream.statistics()
            print(f"loopback     {nbytes / (1 << 20):.0f} MiB over UDP on 127.0.0.1 in "
                  f"{elapsed:.2f} s: {nbytes / elapsed / 1e6:.0f} MB/s")
            print(f"             {st['packets_sent']} packets, {st['retransmits']} retransmitted, "
                  f"rtt {st['rtt_ms']:.2f} ms, socket buffers "
                  f"{a.statistics()['socket_buffers']['rcvbuf'] >> 10} KiB")
            same = sent.digest() == got.digest()
            print(f"sha256       {'equal' if same else 'DIFFERENT'}\n")
            return same

    return trio.run(main)


def _prog() -> str:
    """The name the user typed: the utp-demo script, or python -m utp.demo."""
    name = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    return "python -m utp.demo" if name in ("", "demo.py", "__main__.py", "-c") else name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=_prog(), description=__doc__.splitlines()[0])
    p.add_argument("--mib", type=float, default=8.0, help="MiB to send (default 8)")
    p.add_argument("--mbit", type=float, default=20.0, help="bottleneck Mbit/s (default 20)")
    p.add_argument("--rtt-ms", type=float, default=40.0, help="round-trip time (default 40)")
    p.add_argument("--loss", type=float, default=0.01, help="loss per direction (default 0.01)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--loopback-mib", type=int, default=64,
                   help="MiB for the real loopback transfer (default 64; 0 skips it)")
    args = p.parse_args(argv)
    loop_ok = loopback(args.loopback_mib << 20) if args.loopback_mib else True

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
    print(f"simulated    {nbytes / (1 << 20):.1f} MiB over {args.mbit:g} Mbit/s, "
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
    return 0 if r.ok and loop_ok else 1


if __name__ == "__main__":
    sys.exit(main())
