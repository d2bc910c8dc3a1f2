"""``python -m dht.bench``: the DHT's numbers.

- lookups on a simulated 500-node network (virtual clock): latency, hops,
  queries and datagrams per lookup, exactness against brute force;
- lookups between real nodes on loopback (wall clock);
- memory per 1,000 stored peers;
- queries per second one node answers: the core alone (CPU bound), and a
  node on a loopback Endpoint flooded from a plain UDP socket.

Only loopback addresses are used.  ``--quick`` runs smaller versions.
"""

from __future__ import annotations

import argparse
import gc
import random
import socket
import statistics
import time
import tracemalloc

from _utpkit.bencode import decode_untrusted, encode
from ._core import DHTCore, LookupDone
from ._table import PeerStore
from ._wire import distance
from .sim import SimDHT


def _pct(xs: list[float], p: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


def bench_virtual(n_nodes: int, n_lookups: int) -> None:
    t0 = time.perf_counter()
    sim = SimDHT(seed=7)
    addrs = sim.build(n_nodes, settle=30)
    build = time.perf_counter() - t0
    rng = random.Random(3)
    lat, hops, queried, dgrams, exact = [], [], [], [], 0
    for _ in range(n_lookups):
        a = rng.choice(addrs)
        target = rng.randbytes(20)
        sent0, t = sim.sent, sim.now
        lid = sim.call(a, lambda nd: nd.find_node(target, sim.now))
        ev = sim.run_until_done(a, lid)
        assert ev is not None
        lat.append(sim.now - t)
        dgrams.append(sim.sent - sent0)
        hops.append(ev.hops)
        queried.append(ev.queried)
        truth = sorted((nd.id for nd in sim.nodes.values()), key=lambda i: distance(i, target))[:8]
        exact += [i for i, _ in ev.nodes] == truth
    print(f"virtual, {n_nodes} nodes (one-way delay 10-50 ms), {n_lookups} find_node lookups"
          f" [network built in {build:.1f} s wall]")
    print(f"  latency       median {statistics.median(lat) * 1000:.0f} ms, p90 {_pct(lat, 0.9) * 1000:.0f} ms,"
          f" max {max(lat) * 1000:.0f} ms (virtual)")
    print(f"  queries/lookup mean {statistics.mean(queried):.1f}, max {max(queried)};"
          f" datagrams/lookup (queries+responses, incl. background) mean {statistics.mean(dgrams):.1f}")
    print(f"  hops          mean {statistics.mean(hops):.2f}, max {max(hops)}")
    print(f"  exact k closest: {exact}/{n_lookups}")


def bench_memory(n_peers: int = 100_000, n_hashes: int = 1000) -> None:
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    store = PeerStore(max_total=n_peers, max_per_hash=n_peers)
    rng = random.Random(1)
    hashes = [rng.randbytes(20) for _ in range(n_hashes)]
    for i in range(n_peers):
        store.add(hashes[i % n_hashes], (f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}", 1024 + i % 60000), 0.0)
    used = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    print(f"memory: {n_peers} peers over {n_hashes} infohashes = {used / 1e6:.1f} MB,"
          f" {used / (n_peers / 1000) / 1024:.0f} KiB per 1,000 peers ({used / n_peers:.0f} B/peer)")


def bench_core_qps(seconds: float = 2.0) -> None:
    node = DHTCore(rng=random.Random(1), now=0.0, rate=1e9, burst=1e9)
    rng = random.Random(2)
    for i in range(300):
        node.tables[4].heard_from(rng.randbytes(20), (f"10.1.{i // 250}.{i % 250 + 1}", 6881), 0.0, responded=True)
    ih = rng.randbytes(20)
    for i in range(50):
        node.store.add(ih, (f"10.2.0.{i + 1}", 6881), 0.0)
    msgs = []
    for i in range(3000):
        kind = i % 3
        a = {b"id": rng.randbytes(20)}
        if kind == 0:
            q, a[b"target"] = b"find_node", rng.randbytes(20)
        elif kind == 1:
            q, a[b"info_hash"] = b"get_peers", ih if i % 2 else rng.randbytes(20)
        else:
            q = b"ping"
        msgs.append((encode({b"t": b"%04d" % i, b"y": b"q", b"q": q, b"a": a}),
                     (f"10.3.{(i // 250) % 250}.{i % 250 + 1}", 6881)))
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for data, addr in msgs:
            node.receive_datagram(data, addr, 1.0)
        node.datagrams_to_send()
        n += len(msgs)
    dt = time.perf_counter() - t0
    print(f"core alone: {n / dt:,.0f} queries/s answered (find_node/get_peers/ping mix, one core)")


def bench_loopback(n_nodes: int, n_lookups: int, flood: int) -> None:
    import trio

    import utp

    from . import open_node

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            nodes: list = []
            eps: list = []
            stop = trio.Event()
            ready = trio.Semaphore(0)

            async def run(i: int) -> None:
                async with utp.open_endpoint("127.0.0.1", 0) as ep:
                    boot = [eps[0].local_address] if eps else []
                    eps.append(ep)
                    async with open_node(ep, bootstrap=boot, seed=i, rate=1e6, burst=1e6) as node:
                        nodes.append(node)
                        ready.release()
                        await stop.wait()

            for i in range(n_nodes):
                nursery.start_soon(run, i)
                await ready.acquire()
            for node in nodes:
                await node.bootstrap([eps[0].local_address])
            rng = random.Random(4)
            lat = []
            for _ in range(n_lookups):
                node = rng.choice(nodes)
                t = time.perf_counter()
                await node.find_node(rng.randbytes(20))
                lat.append(time.perf_counter() - t)
            print(f"loopback, {n_nodes} nodes in one process, {n_lookups} find_node lookups")
            print(f"  latency       median {statistics.median(lat) * 1000:.1f} ms,"
                  f" p90 {_pct(lat, 0.9) * 1000:.1f} ms (wall clock)")

            # Flood one node from a plain UDP socket and count its answers.
            target = eps[-1].local_address
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            sock.bind(("127.0.0.1", 0))
            sock.setblocking(False)
            queries = [encode({b"t": i.to_bytes(4, "big"), b"y": b"q", b"q": b"find_node",
                               b"a": {b"id": rng.randbytes(20), b"target": rng.randbytes(20)}})
                       for i in range(flood)]
            # A window of outstanding queries: the rate the node sustains,
            # not how fast its queue overflows.
            window = 256
            answered = sent = lost = 0
            t0 = last_progress = time.perf_counter()
            deadline = t0 + 30.0
            while answered + lost < flood and time.perf_counter() < deadline:
                while sent < flood and sent - answered - lost < window:
                    sock.sendto(queries[sent], target)
                    sent += 1
                await trio.sleep(0)
                while True:
                    try:
                        data = sock.recv(2048)
                    except BlockingIOError:
                        break
                    if decode_untrusted(data).get(b"y") == b"r":
                        answered += 1
                        last_progress = time.perf_counter()
                if time.perf_counter() - last_progress > 0.2:
                    lost = sent - answered      # 200 ms without an answer: dropped
                    last_progress = time.perf_counter()
            dt = time.perf_counter() - t0
            sock.close()
            q = nodes[-1].statistics()["queue"]
            print(f"  flood: {answered}/{flood} find_node queries answered in {dt:.2f} s ="
                  f" {answered / dt:,.0f} queries/s (node and flooder share the process;"
                  f" queue drops {q['dropped']})")
            stop.set()

    trio.run(main)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="utp-bench dht", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller runs")
    args = p.parse_args(argv)
    q = args.quick
    bench_virtual(200 if q else 500, 30 if q else 100)
    bench_loopback(10 if q else 30, 20 if q else 100, 2000 if q else 20000)
    bench_memory(20_000 if q else 100_000)
    bench_core_qps(0.5 if q else 2.0)


if __name__ == "__main__":
    main()
