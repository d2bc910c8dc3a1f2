"""``utp-bench loopback``: real sockets on loopback, side by side.

In one run, with the kernel's stock sysctls:

1. the reference: a raw blast of 1400-byte UDP datagrams with sendmmsg /
   recvmmsg between two processes, one datagram per packet and no GSO/GRO
   (what the kernel moves at this packet size with no protocol; not a
   ceiling for ours, which batches segments with UDP GSO/GRO where the
   kernel has them and so can go faster);
2. ours: ``ucat`` to ``ucat`` over uTP, 256 MiB from a pipe into /dev/null;
3. TCP: the same bytes over a TCP connection between two processes;

printing MB/s, CPU seconds per GB (both processes together) and the ratio of
each to the raw UDP reference.  Then memory per idle connection (10,000 connections
on one Endpoint) and small-message round-trip latency (p50 / p99) for uTP
and TCP.  A benchmark prints numbers; it asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

MiB = 1 << 20
DGRAM = 1400


# ---- helpers -------------------------------------------------------------------------


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def _free_port(kind: int = socket.SOCK_DGRAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _py(*args: str) -> list[str]:
    return [sys.executable, "-m", "utp.bench.loopback", *args]


# `python -m` puts the working directory first on sys.path: children start
# where this process found utp, so they import the same (compiled) package
# even when the benchmark is started in the source checkout.
_CHILD_CWD = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _run_pair(receiver: list[str], sender: list[str], *, stdin_bytes: int | None = None,
              settle: float = 0.3, timeout: float = 600,
              discard_output: bool = False) -> dict[str, Any]:
    """Start receiver, then sender; wait for both.  Returns the CPU seconds
    both used, their exit statuses and the receiver's stdout and stderr."""
    cpu0 = _children_cpu()
    recv = subprocess.Popen(receiver, stdout=subprocess.DEVNULL if discard_output else subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=_CHILD_CWD)
    try:
        time.sleep(settle)
        if stdin_bytes is not None:
            feeder = subprocess.Popen(["head", "-c", str(stdin_bytes), "/dev/zero"],
                                      stdout=subprocess.PIPE)
            send = subprocess.Popen(sender, stdin=feeder.stdout, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, cwd=_CHILD_CWD)
            assert feeder.stdout is not None
            feeder.stdout.close()
        else:
            feeder = None
            send = subprocess.Popen(sender, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE, cwd=_CHILD_CWD)
        _, serr = send.communicate(timeout=timeout)
        rout, rerr = recv.communicate(timeout=timeout)
        if feeder is not None:
            feeder.wait()
    finally:
        if recv.poll() is None:
            recv.kill()
            recv.wait()
    ok = send.returncode == 0 and recv.returncode == 0
    if not ok:
        sys.stderr.write(f"  sender exit {send.returncode}: {serr.decode(errors='replace')[-300:]}\n"
                         f"  receiver exit {recv.returncode}: {rerr.decode(errors='replace')[-300:]}\n")
    return {"cpu": _children_cpu() - cpu0, "ok": ok, "stdout": (rout or b"").decode(errors="replace"),
            "stderr": rerr.decode(errors="replace")}


def _marginal(run: Any, nbytes: int) -> dict[str, Any]:
    """Run a transfer of nbytes and one of 0 bytes with the same commands:
    the CPU difference is what moving the bytes cost, without interpreter
    start-up, imports and connection set-up."""
    full = run(nbytes)
    empty = run(0)
    full["cpu_marginal"] = max(full["cpu"] - empty["cpu"], 0.0)
    return full


# ---- workers (run as subprocesses) ------------------------------------------------------


def _worker_udp_recv(port: int, count: int) -> None:
    from utp import _utp
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    sock.bind(("127.0.0.1", port))
    got, nbytes, seconds = _utp.udp_blast_receive(sock.fileno(), count, 0.5) if count else (0, 0, 0.0)
    print(json.dumps({"datagrams": got, "bytes": nbytes, "seconds": seconds}))


def _worker_udp_send(port: int, count: int) -> None:
    from utp import _utp
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8 << 20)
    if count:
        _utp.udp_blast_send(sock.fileno(), ("127.0.0.1", port), DGRAM, count)


def _worker_tcp_recv(port: int) -> None:
    srv = socket.socket()
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind(("127.0.0.1", port))
    srv.listen(1)
    conn, _ = srv.accept()
    t0 = time.perf_counter()
    buf = bytearray(1 << 20)
    view = memoryview(buf)
    total = 0
    while True:
        n = conn.recv_into(view)
        if not n:
            break
        total += n
    seconds = time.perf_counter() - t0
    conn.close()
    print(json.dumps({"bytes": total, "seconds": seconds}))


def _worker_tcp_send(port: int, nbytes: int) -> None:
    conn = socket.create_connection(("127.0.0.1", port))
    block = bytes(1 << 20)
    left = nbytes
    while left > 0:
        n = min(left, len(block))
        conn.sendall(block[:n])
        left -= n
    conn.close()


# ---- benchmarks ------------------------------------------------------------------------------


def bench_raw_udp(nbytes: int) -> dict[str, Any]:
    def run(n: int) -> dict[str, Any]:
        count = n // DGRAM
        port = _free_port()
        r = _run_pair(_py("udp-recv", str(port), str(count)), _py("udp-send", str(port), str(count)))
        r.update(json.loads(r["stdout"]))
        r["sent"] = count * DGRAM
        return r
    r = _marginal(run, nbytes)
    # UDP drops under overload: the rate is what arrived.
    r["name"] = "raw UDP, mmsg, no GSO/GRO"
    r["delivered"] = r["bytes"] / r["sent"] if r["sent"] else 0
    return r


_UCAT_STATS = re.compile(r"statistics after ([0-9.]+) s")


def bench_ucat(nbytes: int, extra: list[str] | None = None) -> dict[str, Any]:
    ucat = [sys.executable, "-m", "ucat"]

    def run(n: int) -> dict[str, Any]:
        port = _free_port()
        r = _run_pair(ucat + ["-d", "-l", "-p", str(port), "-s", "127.0.0.1"] + (extra or []),
                      ucat + ["127.0.0.1", str(port)] + (extra or []), stdin_bytes=n,
                      discard_output=True)
        m = _UCAT_STATS.search(r["stderr"])
        r["seconds"] = float(m.group(1)) if m else float("nan")
        r["bytes"] = n
        return r
    r = _marginal(run, nbytes)
    r["name"] = "uTP: ucat -> ucat"
    return r


def bench_tcp(nbytes: int) -> dict[str, Any]:
    def run(n: int) -> dict[str, Any]:
        port = _free_port(socket.SOCK_STREAM)
        r = _run_pair(_py("tcp-recv", str(port)), _py("tcp-send", str(port), str(n)))
        r.update(json.loads(r["stdout"]))
        return r
    r = _marginal(run, nbytes)
    r["name"] = "TCP (Python sockets, 1 MiB I/O)"
    return r


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench_idle_connections(n: int) -> dict[str, Any]:
    import trio

    import utp

    result: dict[str, Any] = {}

    async def main() -> None:
        opts = {utp.Option.MAX_SOCKETS: n + 100}
        async with utp.open_endpoint("127.0.0.1", 0, options=opts, linger=0.5) as server, \
                utp.open_endpoint("127.0.0.1", 0, options=opts, linger=0.5) as client:
            listener = server.listen(backlog=n)
            streams = []
            before = _rss_kib()
            t0 = time.perf_counter()

            async def one() -> None:
                streams.append(await client.connect(server.local_address, timeout=120))

            async with trio.open_nursery() as nursery:
                for _ in range(n):
                    nursery.start_soon(one)
            accepted = [await listener.accept() for _ in range(n)]
            setup = time.perf_counter() - t0
            await trio.sleep(1.0)
            after = _rss_kib()
            result.update(connections=n, setup_seconds=setup,
                          rss_delta_kib=after - before,
                          bytes_per_connection_both_ends=(after - before) * 1024 / n,
                          bytes_per_engine_socket=(after - before) * 1024 / (2 * n))
            for s in streams + accepted:
                s.abort()

    trio.run(main)
    return result


def bench_latency(rounds: int, size: int) -> dict[str, Any]:
    import trio

    import utp

    out: dict[str, Any] = {}

    async def utp_rtts() -> list[float]:
        async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.1", 0) as b:
            listener = b.listen()
            s = await a.connect(b.local_address)
            peer = await listener.accept()
            msg = b"x" * size
            rtts = []

            async def echo() -> None:
                while True:
                    data = await peer.receive_some()
                    if not data:
                        return
                    await peer.send_all(data)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(echo)
                for _ in range(rounds):
                    t0 = time.perf_counter()
                    await s.send_all(msg)
                    got = 0
                    while got < size:
                        got += len(await s.receive_some())
                    rtts.append(time.perf_counter() - t0)
                await s.send_eof()
            return rtts

    async def tcp_rtts() -> list[float]:
        async def handler(stream: Any) -> None:
            async for chunk in stream:
                await stream.send_all(chunk)

        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(trio.serve_tcp, handler, 0)
            port = listeners[0].socket.getsockname()[1]
            s = await trio.open_tcp_stream("127.0.0.1", port)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            msg = b"x" * size
            rtts = []
            for _ in range(rounds):
                t0 = time.perf_counter()
                await s.send_all(msg)
                got = 0
                while got < size:
                    got += len(await s.receive_some())
                rtts.append(time.perf_counter() - t0)
            await s.aclose()
            nursery.cancel_scope.cancel()
            return rtts

    for name, fn in (("uTP", utp_rtts), ("TCP", tcp_rtts)):
        rtts = sorted(trio.run(fn))
        out[name] = {"p50_us": rtts[len(rtts) // 2] * 1e6, "p99_us": rtts[int(len(rtts) * 0.99)] * 1e6,
                     "mean_us": statistics.fmean(rtts) * 1e6}
    out["rounds"] = rounds
    out["size"] = size
    return out


# ---- report ------------------------------------------------------------------------------------


def _line(r: dict[str, Any], ceiling: float | None) -> str:
    mbs = r["bytes"] / r["seconds"] / 1e6 if r["seconds"] else float("nan")
    cpu_gb = r["cpu_marginal"] / (r["bytes"] / 1e9) if r["bytes"] else float("nan")
    ratio = f"{mbs / ceiling * 100:5.1f}%" if ceiling else "     -"
    flag = "" if r.get("ok", True) else "  (FAILED)"
    return f"  {r['name']:30} {mbs:9.1f} {cpu_gb:10.2f} {ratio:>10}{flag}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="utp-bench loopback", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256, help="bytes to move per transfer, MiB (256)")
    ap.add_argument("--idle", type=int, default=10000, help="idle connections (10000)")
    ap.add_argument("--rounds", type=int, default=2000, help="latency round trips (2000)")
    ap.add_argument("--quick", action="store_true", help="32 MiB, 2,000 idle, 500 rounds")
    ap.add_argument("--json", action="store_true", help="print one JSON document")
    args = ap.parse_args(argv)
    if args.quick:
        args.mib, args.idle, args.rounds = 32, 2000, 500
    nbytes = args.mib * MiB

    raw = bench_raw_udp(nbytes)
    ours = bench_ucat(nbytes)
    tcp = bench_tcp(nbytes)
    idle = bench_idle_connections(args.idle)
    lat = bench_latency(args.rounds, 64)

    if args.json:
        print(json.dumps({"raw_udp": raw, "utp": ours, "tcp": tcp, "idle": idle, "latency": lat},
                         indent=2))
        return 0
    ceiling = raw["bytes"] / raw["seconds"] / 1e6  # the reference, not a limit
    print(f"throughput on loopback, {args.mib} MiB, stock sysctls "
          f"(rmem_max {_sysctl('net.core.rmem_max')}, wmem_max {_sysctl('net.core.wmem_max')})")
    print(f"  {'':30} {'MB/s':>9} {'CPU s/GB':>10} {'of raw UDP':>10}")
    for r in (raw, ours, tcp):
        print(_line(r, ceiling))
    print("  (raw UDP sends one 1400-byte datagram per packet without GSO/GRO; uTP batches "
          "segments with UDP GSO/GRO where the kernel has them, so it can exceed 100%)")
    print(f"  (raw UDP: {raw['delivered'] * 100:.1f}% of the datagrams sent arrived; CPU is both "
          f"processes, a 0-byte run subtracted; each rate is timed inside the receiver)")
    print(f"\nidle connections: {idle['connections']} on one Endpoint (both ends in this process), "
          f"set up in {idle['setup_seconds']:.1f} s")
    print(f"  memory: {idle['bytes_per_engine_socket']:.0f} bytes per connection end "
          f"({idle['rss_delta_kib'] / 1024:.1f} MiB for {2 * idle['connections']} ends)")
    print(f"\nround trip of a {lat['size']}-byte message, {lat['rounds']} rounds, in-process")
    for name in ("uTP", "TCP"):
        d = lat[name]
        print(f"  {name}: p50 {d['p50_us']:.0f} us   p99 {d['p99_us']:.0f} us   mean {d['mean_us']:.0f} us")
    return 0


def _sysctl(name: str) -> str:
    try:
        with open("/proc/sys/" + name.replace(".", "/")) as f:
            return f.read().strip()
    except OSError:
        return "?"


def _worker_main(argv: list[str]) -> int:
    role, *rest = argv
    if role == "udp-recv":
        _worker_udp_recv(int(rest[0]), int(rest[1]))
    elif role == "udp-send":
        _worker_udp_send(int(rest[0]), int(rest[1]))
    elif role == "tcp-recv":
        _worker_tcp_recv(int(rest[0]))
    elif role == "tcp-send":
        _worker_tcp_send(int(rest[0]), int(rest[1]))
    else:
        print(f"unknown worker role {role!r}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_worker_main(sys.argv[1:]))
