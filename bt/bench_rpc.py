"""``python -m bt.bench rpc``: the cost of bt daemon's aria2 JSON-RPC
(issue 11's benchmark).  Numbers are printed; nothing is asserted.

1. Round-trip latency (p50/p99, one keep-alive HTTP connection, one
   request at a time) of ``tellStatus`` (a random gid, full struct) and
   ``tellActive`` (full structs, and with the few keys a UI asks for)
   with 1,000 small synthetic torrents in the session (no data on disk,
   no peers: every one "active").  The daemon runs as a subprocess
   (``python -m bt daemon``), the client in this process.
2. Notifications per second to 100 WebSocket clients: the daemon's
   server in this process broadcasts aria2 notifications; the time until
   each of the 100 clients (trio-websocket, also in this process: their
   CPU is counted too, so the figure is a floor) has received all of them.
3. The download rate of a running transfer (a libtorrent seed in this
   process, the daemon a subprocess downloading over loopback) with and
   without a client polling ``tellActive`` 10 times a second, alternated
   (plain, polled, plain, polled) to spread the machine's noise.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

__all__ = ["main"]

MiB = 1 << 20


class _Daemon:
    """``python -m bt daemon`` on ephemeral ports; the RPC URL and the peer
    port are read from its first line."""

    def __init__(self, work: Path, *extra: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bt", "daemon", "-d", str(work), "--bind", "127.0.0.1",
             "--rpc-listen", "127.0.0.1:0", *extra],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
            text=True, cwd="/")
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        m = re.search(r"peers on port (\d+); JSON-RPC on (http://\S+)/jsonrpc", line)
        if not m:
            self.proc.kill()
            raise RuntimeError(f"bt daemon did not start: {line!r}")
        self.peer_port = int(m.group(1))
        self.url = m.group(2) + "/jsonrpc"
        err = self.proc.stderr
        threading.Thread(target=lambda: [None for _ in err], daemon=True).start()   # drained
        import httpx
        self.http = httpx.Client(timeout=60)
        self.n = 0

    def call(self, method: str, *params: Any) -> Any:
        self.n += 1
        r = self.http.post(self.url, json={"jsonrpc": "2.0", "id": self.n, "method": method,
                                           "params": list(params)})
        answer = r.json()
        if "error" in answer:
            raise RuntimeError(f"{method}: {answer['error']}")
        return answer["result"]

    def close(self) -> None:
        from .bench import stop_process
        self.http.close()
        stop_process(self.proc, 20)


def synthetic_torrent(n: int, rng: random.Random) -> bytes:
    """A small single-file torrent (4 pieces of 16 KiB) whose data is
    nowhere: enough for status structs."""
    from _utpkit.bencode import encode
    info = {b"name": f"synthetic-{n:04d}".encode(), b"piece length": 16384,
            b"pieces": rng.randbytes(80), b"length": 65536}
    return encode({b"info": info})


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def _timed(daemon: _Daemon, n: int, method: str, *params: Any) -> tuple[float, float]:
    lat = []
    for _ in range(n):
        t = time.perf_counter()
        daemon.call(method, *(p() if callable(p) else p for p in params))
        lat.append(time.perf_counter() - t)
    return _pct(lat, 0.5) * 1000, _pct(lat, 0.99) * 1000


def bench_latency(work: Path, torrents: int, quick: bool) -> list[str]:
    d = _Daemon(work / "lat")
    out = []
    try:
        rng = random.Random(11)
        t0 = time.perf_counter()
        gids = [d.call("aria2.addTorrent", base64.b64encode(synthetic_torrent(i, rng)).decode())
                for i in range(torrents)]
        added = time.perf_counter() - t0
        out.append(f"  {torrents} synthetic torrents added in {added:.1f} s "
                   f"({added / torrents * 1000:.1f} ms per aria2.addTorrent)")
        n = 200 if quick else 1000
        p50, p99 = _timed(d, n, "aria2.tellStatus", lambda: rng.choice(gids))
        out.append(f"  tellStatus (full struct, 1 of {torrents}):  p50 {p50:6.2f} ms  p99 {p99:6.2f} ms  ({n} calls)")
        keys = ["gid", "status", "totalLength", "completedLength", "downloadSpeed", "uploadSpeed"]
        n2 = 10 if quick else 50
        p50, p99 = _timed(d, n2, "aria2.tellActive")
        out.append(f"  tellActive (full structs, {torrents} active): p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({n2} calls)")
        p50, p99 = _timed(d, n2, "aria2.tellActive", keys)
        out.append(f"  tellActive ({len(keys)} keys, {torrents} active):    p50 {p50:6.1f} ms  p99 {p99:6.1f} ms  ({n2} calls)")
    finally:
        d.close()
    return out


async def _ws_worker(url: str, clients: int, count: int) -> None:
    """The clients of the notification benchmark, in a process of their
    own: ``ready`` once all are connected, ``done`` once each has read
    ``count`` messages."""
    import trio
    from trio_websocket import open_websocket_url
    got = [0] * clients
    connected = [0]
    all_connected = trio.Event()

    async def client(i: int) -> None:
        async with open_websocket_url(url, message_queue_size=1024) as ws:
            connected[0] += 1
            if connected[0] == clients:
                all_connected.set()
            while got[i] < count:
                await ws.get_message()
                got[i] += 1
    async with trio.open_nursery() as nursery:
        for i in range(clients):
            nursery.start_soon(client, i)
        await all_connected.wait()
        print("ready", flush=True)
    print("done", flush=True)


async def _notify_rate(clients: int, count: int) -> tuple[float, int]:
    import trio

    from .rpc.daemon import daemon_args, serve_daemon
    tmp = tempfile.mkdtemp(prefix="bt-bench-notify-")
    try:
        args = daemon_args("-d", tmp, "--bind", "127.0.0.1", "--rpc-listen", "127.0.0.1:0",
                           "--max-ws-clients", str(clients + 1))
        async with trio.open_nursery() as nursery:
            running = await nursery.start(lambda task_status: serve_daemon(args, task_status=task_status))
            server = running.server
            server.ws_queue = count + 16      # measure delivery, not the slow-client cut-off
            ws_url = running.url.replace("http", "ws") + "/jsonrpc"
            worker = subprocess.Popen([sys.executable, "-m", "bt.bench_rpc", "--ws-worker", ws_url,
                                       str(clients), str(count)], stdout=subprocess.PIPE,
                                      text=True, cwd="/")
            assert worker.stdout is not None
            try:
                line = await trio.to_thread.run_sync(worker.stdout.readline)
                if line.strip() != "ready":
                    raise RuntimeError(f"the WebSocket clients did not connect: {line!r}")
                while len(server.clients) < clients:
                    await trio.sleep(0.01)
                t0 = time.perf_counter()
                for k in range(count):
                    server.broadcast("aria2.onDownloadStart", f"{k + 1:016x}")
                    if k % 100 == 99:
                        await trio.sleep(0)
                line = await trio.to_thread.run_sync(worker.stdout.readline)
                elapsed = time.perf_counter() - t0
                if line.strip() != "done":
                    raise RuntimeError(f"the WebSocket clients failed: {line!r}")
            finally:
                worker.kill()
                worker.wait()
            dropped = server.counters["ws.dropped_slow"]
            nursery.cancel_scope.cancel()
        return count / elapsed, dropped
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def bench_notifications(clients: int, count: int) -> list[str]:
    import trio
    rate, dropped = trio.run(_notify_rate, clients, count)
    return [f"  {count} notifications to each of {clients} WebSocket clients (clients in another "
            f"process): {rate:,.0f} notifications/s to all ({rate * clients:,.0f} messages/s), "
            f"{dropped} clients dropped as slow"]


def _transfer(work: Path, data: bytes, handle: Any, poll: bool, n: int) -> tuple[float, int]:
    """One download by a fresh daemon from the libtorrent seed ``handle``
    (told to dial it); returns (MB/s from the first byte to the last, and
    the tellActive calls made meanwhile)."""
    d = _Daemon(work / f"dl{n}")
    polls = [0]
    stop = threading.Event()
    try:
        gid = d.call("aria2.addTorrent", base64.b64encode(data).decode())
        total = int(d.call("aria2.tellStatus", gid, ["totalLength"])["totalLength"])

        def poller() -> None:
            import httpx
            with httpx.Client(timeout=30) as h:
                while not stop.is_set():
                    t = time.perf_counter()
                    h.post(d.url, json={"jsonrpc": "2.0", "id": 1, "method": "aria2.tellActive",
                                        "params": []})
                    polls[0] += 1
                    stop.wait(max(0.0, 0.1 - (time.perf_counter() - t)))
        if poll:
            threading.Thread(target=poller, daemon=True).start()
        handle.connect_peer(("127.0.0.1", d.peer_port))
        t_start: float | None = None
        first = 0
        deadline = time.monotonic() + 600
        done = 0
        while done < total:
            if time.monotonic() > deadline:
                raise RuntimeError("transfer timed out")
            done = int(d.call("aria2.tellStatus", gid, ["completedLength"])["completedLength"])
            if t_start is None and done > 0:
                t_start, first = time.perf_counter(), done
            time.sleep(0.05)
        elapsed = time.perf_counter() - (t_start or time.perf_counter())
        return (total - first) / elapsed / 1e6, polls[0]
    finally:
        stop.set()
        d.close()


def bench_transfer(work: Path, size: int, rounds: int) -> list[str]:
    import libtorrent as lt

    from .bench import _make_content, libtorrent_settings
    (work / "payload").mkdir(parents=True)
    src, torrent_path = _make_content(work / "payload", size)
    data = torrent_path.read_bytes()
    # 4 MiB socket buffers: with the kernel's default its uTP drops packets
    # and the rate swings, hiding what polling costs (../shared/PEERS.md)
    ses = lt.session(libtorrent_settings("127.0.0.1", "both", buffers=4 * MiB))  # type: ignore[call-overload]
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))                                   # type: ignore[arg-type]
    atp.save_path = str(src)
    handle = ses.add_torrent(atp)
    while handle.status().state != lt.torrent_status.seeding:
        time.sleep(0.05)
    plain: list[float] = []
    polled: list[float] = []
    out = []
    try:
        for r in range(rounds):
            for poll in (False, True):
                rate, polls = _transfer(work, data, handle, poll, r * 2 + poll)
                (polled if poll else plain).append(rate)
                out.append(f"  round {r + 1}, {'polling tellActive 10/s' if poll else 'no polling':24}: "
                           f"{rate:7.1f} MB/s" + (f" ({polls} tellActive calls)" if poll else ""))
    finally:
        ses.remove_torrent(handle)
        del ses
    a, b = statistics.mean(plain), statistics.mean(polled)
    out.append(f"  mean: {a:.1f} MB/s plain, {b:.1f} MB/s polled: "
               f"{(a - b) / a * 100:+.1f}% drop (target < 5%)")
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bt.bench rpc",
                                 description="bt daemon's JSON-RPC: latency with 1,000 torrents, "
                                             "notifications/s to 100 WebSocket clients, download "
                                             "rate with and without tellActive polling")
    ap.add_argument("--quick", action="store_true", help="fewer calls, a 64 MiB transfer, 1 round")
    ap.add_argument("--torrents", type=int, default=1000)
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--notifications", type=int, default=2000)
    ap.add_argument("--size-mib", type=int, default=None)
    ap.add_argument("--rounds", type=int, default=None)
    ap.add_argument("--only", choices=("latency", "notifications", "transfer"), default=None)
    ap.add_argument("--ws-worker", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ws_worker:
        import trio
        url, n, count = args.ws_worker
        trio.run(_ws_worker, url, int(n), int(count))
        return 0
    work = Path(tempfile.mkdtemp(prefix="bt-bench-rpc-"))
    try:
        if args.only in (None, "latency"):
            print("RPC round trips (daemon subprocess, one keep-alive HTTP connection):", flush=True)
            for line in bench_latency(work, args.torrents, args.quick):
                print(line, flush=True)
        if args.only in (None, "notifications"):
            print("WebSocket notifications:", flush=True)
            for line in bench_notifications(args.clients, args.notifications):
                print(line, flush=True)
        if args.only in (None, "transfer"):
            size = (args.size_mib or (64 if args.quick else 256)) * MiB
            rounds = args.rounds or (1 if args.quick else 2)
            print(f"Download of {size // MiB} MiB from a libtorrent seed (loopback):", flush=True)
            for line in bench_transfer(work, size, rounds):
                print(line, flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
