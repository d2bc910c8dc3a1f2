"""``python -m utp.bench flood``: a listener under hostile load, on loopback.

For SYN floods of 1,000, 10,000 and 100,000 per second (spoofed from many
127.0.0.0/8 source addresses, which Linux lets a process bind on loopback),
a listener that accepts everything is probed by a legitimate client that
connects, sends one byte and waits for its echo, again and again.  Printed
per rate: the rate the flooder reached, the legitimate connect latency
(p50, p99: connect + first byte echoed), the listener's memory (RSS growth
and peak engine sockets), the reply ratio (bytes the flood's sources
received back / bytes they sent) and the datagrams the kernel dropped at
the listener's socket (a dropped legitimate SYN costs a 1 s retry).  A benchmark prints numbers; it asserts
nothing (tests/test_flood.py asserts the bounds).

The flooder is also a worker the tests use:
``python -m utp.bench.flood worker HOST PORT KIND COUNT RATE SOURCES``
prints one JSON line: packets and bytes sent, replies received, seconds.
KIND is ``syn`` (a well-formed SYN), ``junk`` (1,000 random bytes starting
0x41) or ``data`` (120-byte DATA for connections nobody has).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import select
import socket
import statistics
import struct
import subprocess
import sys
import time
from typing import Any

ST_DATA, ST_SYN = 0, 4


def packet(kind: str, rng: random.Random) -> bytes:
    """One datagram of the given flood kind."""
    if kind == "junk":
        return b"\x41" + rng.randbytes(999)
    ts = int(time.monotonic() * 1e6) & 0xFFFFFFFF
    cid, seq, ack = rng.getrandbits(16), rng.getrandbits(16), rng.getrandbits(16)
    if kind == "syn":
        return struct.pack(">BBHIIIHH", ST_SYN << 4 | 1, 0, cid, ts, 0, 1 << 20, seq, 0)
    if kind == "data":
        return struct.pack(">BBHIIIHH", ST_DATA << 4 | 1, 0, cid, ts, 0, 1 << 20, seq, ack) + b"d" * 100
    raise ValueError(f"unknown flood kind {kind!r} (syn, junk or data)")


def source_addresses(n: int, base: int = 1) -> list[str]:
    """n distinct loopback addresses 127.<base>.x.y (never 127.0.0.1)."""
    return [f"127.{base}.{i // 250}.{i % 250 + 1}" for i in range(n)]


def flood(host: str, port: int, kind: str, count: int, rate: float, nsources: int,
          *, seed: int = 1, drain: float = 0.5) -> dict[str, Any]:
    """Send count datagrams of `kind` to (host, port) at `rate` per second,
    round-robin from nsources sockets bound to distinct 127/8 addresses, and
    count what comes back to them (the reflection)."""
    rng = random.Random(seed)
    socks = []
    for addr in source_addresses(nsources):
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind((addr, 0))
        s.setblocking(False)
        socks.append(s)
    by_fd = {s.fileno(): s for s in socks}
    poller = select.epoll()
    for s in socks:
        poller.register(s.fileno(), select.EPOLLIN)
    got = {"packets": 0, "bytes": 0}

    def drain_replies(timeout: float) -> None:
        for fd, _ in poller.poll(timeout):
            s = by_fd[fd]
            while True:
                try:
                    data = s.recv(65536)
                except BlockingIOError:
                    break
                got["packets"] += 1
                got["bytes"] += len(data)

    target = (host, port)
    sent = sent_bytes = dropped = 0
    t0 = time.monotonic()
    tick = 0.005
    while sent < count:
        due = min(count, int((time.monotonic() - t0) * rate) + 1)
        while sent < due:
            data = packet(kind, rng)
            try:
                socks[sent % len(socks)].sendto(data, target)
                sent_bytes += len(data)
            except (BlockingIOError, OSError):
                dropped += 1
            sent += 1
        drain_replies(0)
        if sent < count:
            time.sleep(max(0.0, min(tick, t0 + sent / rate - time.monotonic())))
    seconds = time.monotonic() - t0
    end = time.monotonic() + drain
    while time.monotonic() < end:
        drain_replies(0.05)
    for s in socks:
        s.close()
    poller.close()
    return {"kind": kind, "sent": sent, "send_failed": dropped, "sent_bytes": sent_bytes,
            "reply_packets": got["packets"], "reply_bytes": got["bytes"], "seconds": seconds,
            "rate": sent / seconds if seconds > 0 else 0.0}


def start_flooder(host: str, port: int, kind: str, count: int, rate: float,
                  nsources: int) -> subprocess.Popen:
    """The flooder as a separate process (its own CPU, like a real attacker).
    It imports the same utp as this process, whatever the working directory."""
    import utp
    root = os.path.dirname(os.path.dirname(os.path.abspath(utp.__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    return subprocess.Popen([sys.executable, "-m", "utp.bench.flood", "worker", host, str(port), kind,
                             str(count), str(rate), str(nsources)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/")


def flooder_result(proc: subprocess.Popen, timeout: float = 120) -> dict[str, Any]:
    out, err = proc.communicate(timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"flooder failed ({proc.returncode}): {err.decode(errors='replace')[-500:]}")
    return json.loads(out)


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


# ---- the benchmark ----------------------------------------------------------------------------


async def _probe_under_flood(rate: int, seconds: float, nsources: int) -> dict[str, Any]:
    import trio

    import utp

    latencies: list[float] = []
    failures = 0
    async with utp.open_endpoint("127.0.0.1", 0) as server, utp.open_endpoint("127.0.0.1", 0) as client:
        listener = server.listen(backlog=1024)
        port = server.local_address[1]

        async def echo(stream) -> None:
            with trio.move_on_after(5):
                data = await stream.receive_some(1)
                if data:
                    await stream.send_all(data)
            await stream.aclose()

        async def accept_all() -> None:
            async with trio.open_nursery() as n:
                while True:
                    n.start_soon(echo, await listener.accept())

        rss0 = rss_kib()
        peak_rss = rss0
        count = int(rate * seconds)
        proc = start_flooder("127.0.0.1", port, "syn", count, rate, nsources)
        async with trio.open_nursery() as nursery:
            nursery.start_soon(accept_all)
            await trio.sleep(min(1.0, seconds / 4))
            while proc.poll() is None:
                t0 = time.perf_counter()
                try:
                    with trio.fail_after(5):
                        s = await client.connect(("127.0.0.1", port), attempt_timeout=1.0)
                        await s.send_all(b"x")
                        await s.receive_some(1)
                        latencies.append(time.perf_counter() - t0)
                        await s.aclose()
                except (trio.TooSlowError, OSError, trio.BrokenResourceError):
                    failures += 1
                peak_rss = max(peak_rss, rss_kib())
                await trio.sleep(0.05)
            nursery.cancel_scope.cancel()
        result = await trio.to_thread.run_sync(flooder_result, proc)
        st = server.statistics()
        engine = st["engine"]
        kernel_drops = st.get("io", {}).get("kernel_drops", 0)
    lat = sorted(latencies)

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(p * len(lat)))] * 1000 if lat else float("nan")
    return {"rate_asked": rate, "rate": result["rate"], "sent": result["sent"],
            "p50_ms": pct(0.50), "p99_ms": pct(0.99), "samples": len(lat), "failures": failures,
            "rss_growth_kib": peak_rss - rss0, "sockets_peak": engine.get("sockets_peak"),
            "half_open_peak": engine.get("half_open_peak"), "cookies": engine.get("syn_cookies"),
            "kernel_drops": kernel_drops,
            "reply_ratio": result["reply_bytes"] / result["sent_bytes"] if result["sent_bytes"] else 0.0}


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] == "worker":
        host, port, kind, count, rate, nsources = args[1:7]
        print(json.dumps(flood(host, int(port), kind, int(count), float(rate), int(nsources))))
        return 0
    p = argparse.ArgumentParser(prog="python -m utp.bench flood", description=__doc__.split("\n\n")[1])
    p.add_argument("--rates", default="1000,10000,100000", help="SYNs per second, comma-separated")
    p.add_argument("--seconds", type=float, default=4.0, help="length of each flood (4)")
    p.add_argument("--sources", type=int, default=250, help="spoofed source addresses (250)")
    opts = p.parse_args(args)
    import trio
    rows = [trio.run(_probe_under_flood, int(r), opts.seconds, opts.sources) for r in opts.rates.split(",")]
    print(f"{'SYN/s asked':>11} {'reached':>8} {'p50 ms':>7} {'p99 ms':>7} {'n':>4} {'fail':>4} "
          f"{'RSS +KiB':>8} {'sockets':>7} {'cookies':>8} {'reply ratio':>11} {'kernel drops':>12}")
    for r in rows:
        print(f"{r['rate_asked']:>11} {r['rate']:>8.0f} {r['p50_ms']:>7.1f} {r['p99_ms']:>7.1f} "
              f"{r['samples']:>4} {r['failures']:>4} {r['rss_growth_kib']:>8} {r['sockets_peak']:>7} "
              f"{r['cookies']:>8} {r['reply_ratio']:>11.3f} {r['kernel_drops']:>12}")
    if rows and not any(r["samples"] for r in rows):
        print("no legitimate connection completed", file=sys.stderr)
    base = rows[0]
    for r in rows[1:]:
        if base["p50_ms"] and base["p50_ms"] == base["p50_ms"]:
            print(f"p50 at {r['rate_asked']}/s is {r['p50_ms'] / base['p50_ms']:.2f}x the p50 at "
                  f"{base['rate_asked']}/s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
