"""``python -m bt.bench``: BitTorrent download speed and cost on loopback.
(``python -m bt.bench rpc``: bt daemon's JSON-RPC, see :mod:`bt.bench_rpc`.)

In one run, one single-file torrent of random data (512 MiB; ``--quick``:
64 MiB) is downloaded, seed to leecher, in six pairings:

- our peer from a libtorrent seed, over uTP and over TCP;
- libtorrent from libtorrent, over uTP and over TCP: the reference,
  measured in the same run on the same (shared, noisy) machine;
- our peer from our peer, over uTP and over TCP.

Every side runs in a process of its own (``python -m bt.bench --worker``),
so its CPU time (user + system, all threads, from ``getrusage``) and its
peak RSS (``VmHWM`` of /proc/self/status, which an ``exec`` resets) are
its own.  CPU is counted from the moment the seed is ready (its data
checked) and the leecher dials, to the last verified piece; it is printed
per GB of payload.  libtorrent runs with its default settings, as users
run it: its socket buffers are then the OS's (208 KiB), with which its uTP
receiver drops bursts (../shared/PEERS.md).  ``--lt-buffers 4`` gives it
4 MiB buffers instead, libtorrent's best case, to compare against too.

Then the two ratios of issue 8's targets: our uTP download from libtorrent
against libtorrent's own uTP-to-uTP figure (target >= 2x), and our
peer-to-peer uTP figure against our TCP one (target >= 80%).  Numbers are
printed; nothing is asserted.  ``--profile DIR`` writes a cProfile dump of
each of our workers' main thread to DIR (the ratios are then not
meaningful).

``--mse`` runs issue 9's benchmark instead: our peer to our peer over uTP,
plain and with MSE required on both sides (RC4 throughout), alternated
(``--repeat N`` of each, default 2), then both means and their ratio
(target: RC4 costs <= 10%).

:func:`libtorrent_settings` is also what the swarm test starts its
libtorrent seed with.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import select
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

__all__ = ["libtorrent_settings", "RUNS", "Run", "RunResult", "main"]

MiB = 1 << 20
GB = 1e9


def libtorrent_settings(ip: str, transport: str, *, buffers: int = 0) -> dict[str, Any]:
    """libtorrent session settings for loopback runs: bound to ``ip``,
    ``transport`` "utp", "tcp" or "both", plain handshakes, nothing that
    leaves the machine (no DHT, LSD, UPnP, NAT-PMP), several connections
    per IP (every peer is 127.0.0.1); socket buffers of ``buffers`` bytes
    (0: libtorrent's default, the OS's), everything else at its default."""
    if transport not in ("utp", "tcp", "both"):
        raise ValueError(f"transport must be 'utp', 'tcp' or 'both', not {transport!r}")
    utp, tcp = transport != "tcp", transport != "utp"
    return {
        "listen_interfaces": f"{ip}:0",
        "enable_dht": False, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False, "dht_bootstrap_nodes": "",
        "enable_outgoing_utp": utp, "enable_incoming_utp": utp,
        "enable_outgoing_tcp": tcp, "enable_incoming_tcp": tcp,
        "in_enc_policy": 2, "out_enc_policy": 2,
        "allow_multiple_connections_per_ip": True,
    } | ({"recv_socket_buffer_size": buffers, "send_socket_buffer_size": buffers} if buffers else {})


@dataclass(frozen=True)
class Run:
    """One pairing: who seeds, who leeches ("lt" or "ours"), over what."""
    seed: str
    leech: str
    transport: str
    #: our sessions' MSE policy on both sides ("required": RC4 throughout)
    encryption: str = "disabled"

    @property
    def name(self) -> str:
        rc4 = "+rc4" if self.encryption == "required" else ""
        return f"{self.leech}<-{self.seed}/{self.transport}{rc4}"


RUNS = (Run("lt", "ours", "utp"), Run("lt", "ours", "tcp"),
        Run("lt", "lt", "utp"), Run("lt", "lt", "tcp"),
        Run("ours", "ours", "utp"), Run("ours", "ours", "tcp"))
#: ``--mse``: our peer to our peer over uTP, plain and RC4 (MSE required on
#: both sides), alternated (``--repeat`` times) so the machine's drift hits both.
MSE_RUNS = (Run("ours", "ours", "utp"), Run("ours", "ours", "utp", "required"))


@dataclass
class RunResult:
    run: Run
    seconds: float | None = None          # None: it did not finish
    leech_cpu: float = 0.0
    seed_cpu: float = 0.0
    leech_hwm_kib: int = 0
    seed_hwm_kib: int = 0
    via: str = ""                         # the transport the leecher really used
    enc: str = ""                         # what MSE selected on our leecher ("": none)
    error: str = ""
    #: our processes' counters, by side ("seed"/"leech"): the main thread's
    #: CPU seconds, and on uTP the streams' retransmissions etc.
    ours: dict[str, dict[str, float]] = field(default_factory=dict)

    def mb_s(self, size: int) -> float | None:
        return size / 1e6 / self.seconds if self.seconds else None


# ---- the worker processes ----------------------------------------------------------------


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _hwm_kib() -> int:
    """Peak RSS of this process (VmHWM: unlike ru_maxrss it does not carry
    the forking parent's peak across exec)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    return 0


def _emit(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj) + "\n")
    sys.stdout.flush()


def _lt_worker(job: dict[str, Any]) -> None:
    import libtorrent as lt

    ses = lt.session(libtorrent_settings("127.0.0.1", job["transport"],  # type: ignore[call-overload]
                                         buffers=job["lt_buffers"]))
    params = lt.add_torrent_params()
    params.ti = lt.torrent_info(job["torrent"])
    params.save_path = job["dir"]
    params.flags &= ~lt.torrent_flags.auto_managed
    params.flags &= ~lt.torrent_flags.paused
    handle = ses.add_torrent(params)
    if job["role"] == "seed":
        # a full check of the data, like our seed's, before the clock starts
        deadline = time.monotonic() + job["timeout"]
        while not handle.status().is_seeding:
            if time.monotonic() > deadline:
                raise SystemExit("libtorrent seed: the data never checked complete")
            time.sleep(0.05)
        _emit({"port": ses.listen_port()})
        cpu0 = _cpu()
        sys.stdin.readline()                         # "stop"
        _emit({"cpu": _cpu() - cpu0, "hwm_kib": _hwm_kib()})
        return
    cpu0, t0 = _cpu(), time.perf_counter()
    handle.connect_peer(("127.0.0.1", job["peer"]))
    via: set[str] = set()
    deadline = t0 + job["timeout"]
    while not handle.status().is_seeding:
        if time.perf_counter() > deadline:
            raise SystemExit("libtorrent leecher: timed out")
        for p in handle.get_peer_info():
            via.add("utp" if int(p.flags) & (1 << 17) else "tcp")
        time.sleep(0.02)
    seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
    _emit({"seconds": seconds, "cpu": cpu, "hwm_kib": _hwm_kib(), "via": "+".join(sorted(via))})


_UTP_COUNTERS = ("retransmits", "timeouts", "loss_events")


async def _watch_utp(torrent: Any, last: dict[int, dict[str, Any]]) -> None:
    """Keep the latest statistics of each uTP connection (a connection's
    are gone once it closes, which a finished download does)."""
    import trio
    while True:
        for p in list(torrent.peers):
            if p.transport == "utp":
                last[id(p)] = p.transport_stream.statistics()
        await trio.sleep(0.25)


def _utp_summary(session: Any, last: dict[int, dict[str, Any]]) -> dict[str, float]:
    if session.endpoint is None:
        return {}
    out: dict[str, float] = {k: sum(st[k] for st in last.values()) for k in _UTP_COUNTERS}
    out["rtt_ms"] = max((st["rtt_ms"] for st in last.values()), default=0.0)
    out["kernel_drops"] = session.endpoint.statistics()["io"]["kernel_drops"]
    return out


async def _our_worker(job: dict[str, Any]) -> None:
    import trio

    from .session import open_session

    utp, tcp = job["transport"] == "utp", job["transport"] == "tcp"
    last: dict[int, dict[str, Any]] = {}
    async with open_session(download_dir=job["dir"], host="127.0.0.1", utp=utp, tcp=tcp,
                            resume_dir=job["resume"],
                            encryption=job.get("encryption", "disabled")) as session, \
            trio.open_nursery() as nursery:
        torrent = await session.add_torrent(job["torrent"])
        nursery.start_soon(_watch_utp, torrent, last)
        if job["role"] == "seed":
            _emit({"port": session.port})
            cpu0, main0 = _cpu(), time.thread_time()
            await trio.to_thread.run_sync(sys.stdin.readline)
            _emit({"cpu": _cpu() - cpu0, "hwm_kib": _hwm_kib(),
                   "utp": {**_utp_summary(session, last),
                           "main_thread_cpu": time.thread_time() - main0}})
            nursery.cancel_scope.cancel()
            return
        cpu0, t0, main0 = _cpu(), time.perf_counter(), time.thread_time()
        torrent.add_peer(("127.0.0.1", job["peer"]))
        with trio.fail_after(job["timeout"]):
            await torrent.wait_finished()
        seconds, cpu = time.perf_counter() - t0, _cpu() - cpu0
        via = "+".join(k.split(".")[1] for k, v in sorted(session.counters.items())
                       if k.startswith("connections.") and v)
        enc = "+".join(k.split(".")[2] for k, v in sorted(session.counters.items())
                       if k.startswith("mse.out.") and v)
        _emit({"seconds": seconds, "cpu": cpu, "hwm_kib": _hwm_kib(), "via": via, "enc": enc,
               "utp": {**_utp_summary(session, last),
                       "main_thread_cpu": time.thread_time() - main0}})
        nursery.cancel_scope.cancel()


def _worker(job: dict[str, Any]) -> None:
    if job["impl"] == "lt":
        _lt_worker(job)
        return
    import trio
    if not job.get("profile"):
        trio.run(_our_worker, job)
        return
    import cProfile
    prof = cProfile.Profile()
    prof.enable()
    try:
        trio.run(_our_worker, job)
    finally:
        prof.disable()
        prof.dump_stats(job["profile"])


# ---- the parent ----------------------------------------------------------------------------


class _WorkerError(Exception):
    pass


class _Worker:
    """One worker process, JSON lines on its stdout."""

    def __init__(self, job: dict[str, Any]) -> None:
        import bt
        env = dict(os.environ)
        # the children import the same bt as this process, from "/" so that
        # a source tree in the working directory cannot shadow it
        where = str(Path(bt.__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [where, env.get("PYTHONPATH")]))
        self.what = f"{job['impl']} {job['role']}"
        self.proc = subprocess.Popen([sys.executable, "-m", "bt.bench", "--worker", json.dumps(job)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/",
                                     env=env)
        self._buf = b""

    def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise _WorkerError(f"{self.what}: no answer in {timeout:.0f} s")
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 65536)
                if not chunk:
                    self.proc.wait()
                    raise _WorkerError(f"{self.what}: exited with status {self.proc.returncode}")
                self._buf += chunk
        line, _, self._buf = self._buf.partition(b"\n")
        return json.loads(line)

    def tell(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        self.proc.stdin.flush()

    def close(self) -> None:
        stop_process(self.proc)
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


def _run_one(run: Run, work: Path, torrent: Path, content_dir: Path, timeout: float, lt_buffers: int,
             profile: Path | None) -> RunResult:
    res = RunResult(run)
    leech_dir = work / "leech"
    shutil.rmtree(leech_dir, ignore_errors=True)
    leech_dir.mkdir()
    common = {"transport": run.transport, "torrent": str(torrent), "timeout": timeout,
              "encryption": run.encryption, "lt_buffers": lt_buffers}
    seed_job = {**common, "impl": run.seed, "role": "seed", "dir": str(content_dir),
                "resume": str(work / "seed-resume")}
    leech_job = {**common, "impl": run.leech, "role": "leech", "dir": str(leech_dir),
                 "resume": str(leech_dir / ".resume")}
    if profile is not None:
        tag = run.name.replace("<-", "-from-").replace("/", "-")
        seed_job["profile"] = str(profile / f"{tag}-seed.pstats")
        leech_job["profile"] = str(profile / f"{tag}-leech.pstats")
    seed = _Worker(seed_job)
    leech: _Worker | None = None
    try:
        port = seed.read(timeout)["port"]
        leech = _Worker({**leech_job, "peer": port})
        got = leech.read(timeout + 30)
        res.seconds, res.leech_cpu = got["seconds"], got["cpu"]
        res.leech_hwm_kib, res.via, res.enc = got["hwm_kib"], got["via"], got.get("enc", "")
        if got.get("utp"):
            res.ours["leech"] = got["utp"]
        leech.proc.wait(30)
        seed.tell("stop")
        got = seed.read(30)
        res.seed_cpu, res.seed_hwm_kib = got["cpu"], got["hwm_kib"]
        if got.get("utp"):
            res.ours["seed"] = got["utp"]
        seed.proc.wait(30)
    except (_WorkerError, subprocess.TimeoutExpired, KeyError) as exc:
        res.seconds = None
        res.error = str(exc)
    finally:
        for w in (leech, seed):
            if w is not None:
                w.close()
        shutil.rmtree(leech_dir, ignore_errors=True)
    return res


def stop_process(proc: subprocess.Popen[Any], grace: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if ``proc`` is still there after ``grace``
    seconds; waits for it either way."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _make_content(work: Path, size: int) -> tuple[Path, Path]:
    from .create import create_torrent
    content_dir = work / "seed"
    content_dir.mkdir()
    rng = random.Random(8)
    path = content_dir / "bench.bin"
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 4 * MiB)
            f.write(rng.randbytes(n))
            left -= n
    torrent = work / "bench.torrent"
    torrent.write_bytes(create_torrent(path))
    return content_dir, torrent


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def report(results: Sequence[RunResult], size: int) -> str:
    """The table and the two target ratios, as printed."""
    gb = size / GB
    lines = [f"{'run':22} {'via':5} {'s':>7} {'MB/s':>7} {'leech CPU s/GB':>15} "
             f"{'seed CPU s/GB':>14} {'leech RSS MiB':>14} {'seed RSS MiB':>13}"]
    for r in results:
        done = r.seconds is not None
        lines.append(
            f"{r.run.name:22} {r.via or '-':5} {_fmt(r.seconds, '7.2f')} "
            f"{_fmt(r.mb_s(size), '7.1f')} "
            f"{_fmt(r.leech_cpu / gb if done else None, '15.2f')} "
            f"{_fmt(r.seed_cpu / gb if done else None, '14.2f')} "
            f"{_fmt(r.leech_hwm_kib / 1024 if done else None, '14.1f')} "
            f"{_fmt(r.seed_hwm_kib / 1024 if done else None, '13.1f')}"
            + (f"  FAILED: {r.error}" if r.error else ""))
    by = {r.run: r.mb_s(size) for r in results}

    def ratio(a: Run, b: Run, what: str, target: float, unit: str) -> str:
        x, y = by.get(a), by.get(b)
        if x is None or y is None:
            return f"{what}: - (a run is missing or failed)"
        value = x / y
        verdict = "meets" if value >= target else "misses"
        shown = f"{value:.2f}x" if unit == "x" else f"{value * 100:.0f}%"
        goal = f"{target:g}x" if unit == "x" else f"{target * 100:.0f}%"
        return f"{what}: {shown} ({verdict} the target >= {goal})"

    diag = []
    for r in results:
        for side, st in sorted(r.ours.items()):
            if r.seconds is None:
                continue
            total = r.leech_cpu if side == "leech" else r.seed_cpu
            text = f"  {r.run.name} {side}: main thread {st['main_thread_cpu'] / gb:.2f} s/GB " \
                   f"of {total / gb:.2f}"
            if "retransmits" in st:
                text += ", uTP " + ", ".join(f"{st[k]:.0f} {k.replace('_', ' ')}"
                                             for k in (*_UTP_COUNTERS, "kernel_drops"))
                text += f", srtt {st['rtt_ms']:.1f} ms"
            diag.append(text)
    if diag:
        lines += ["", "our processes: CPU of the main thread (the event loop; the rest is the "
                  "disk threads: writes, hashing); uTP counters of our side (drops: the "
                  "kernel's, at our socket)", *diag]
    lines.append("")
    lines.append(ratio(Run("lt", "ours", "utp"), Run("lt", "lt", "utp"),
                       "ours<-lt/utp vs lt<-lt/utp", 2.0, "x"))
    lines.append(ratio(Run("ours", "ours", "utp"), Run("ours", "ours", "tcp"),
                       "ours<-ours/utp vs ours<-ours/tcp", 0.8, "%"))
    return "\n".join(lines)


def report_mse(results: Sequence[RunResult], size: int) -> str:
    """``--mse``: plain vs RC4 MB/s (each run, then the means) and the
    ratio against issue 9's target (RC4 costs at most 10%)."""
    gb = size / GB
    lines = [f"{'run':22} {'enc':5} {'s':>7} {'MB/s':>7} {'leech CPU s/GB':>15} "
             f"{'seed CPU s/GB':>14}"]
    speeds: dict[str, list[float]] = {"plain": [], "rc4": []}
    for r in results:
        done = r.seconds is not None
        lines.append(f"{r.run.name:22} {r.enc or '-':5} {_fmt(r.seconds, '7.2f')} "
                     f"{_fmt(r.mb_s(size), '7.1f')} "
                     f"{_fmt(r.leech_cpu / gb if done else None, '15.2f')} "
                     f"{_fmt(r.seed_cpu / gb if done else None, '14.2f')}"
                     + (f"  FAILED: {r.error}" if r.error else ""))
        mb = r.mb_s(size)
        if mb is not None:
            speeds["rc4" if r.run.encryption == "required" else "plain"].append(mb)
    lines.append("")
    if not (speeds["plain"] and speeds["rc4"]):
        lines.append("rc4 vs plain over uTP: - (a run is missing or failed)")
        return "\n".join(lines)
    plain = sum(speeds["plain"]) / len(speeds["plain"])
    rc4 = sum(speeds["rc4"]) / len(speeds["rc4"])
    value = rc4 / plain
    verdict = "meets" if value >= 0.9 else "misses"
    lines.append(f"mean over uTP: plain {plain:.1f} MB/s, rc4 {rc4:.1f} MB/s")
    lines.append(f"rc4 vs plain over uTP: {value * 100:.0f}% ({verdict} the target >= 90%: "
                 f"RC4 costs at most 10%)")
    return "\n".join(lines)


def _mib(text: str) -> int:
    """``--lt-buffers``: a whole number of MiB, 0 for libtorrent's default."""
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number of MiB, not {text!r}") from None
    if not 0 <= n <= 256:
        raise argparse.ArgumentTypeError(f"{n} MiB: expected 0..256")
    return n * MiB


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["rpc"]:             # python -m bt.bench rpc: bt daemon's JSON-RPC
        from .bench_rpc import main as rpc_main
        return rpc_main(argv[1:])
    ap = argparse.ArgumentParser(
        prog="python -m bt.bench",
        description="BitTorrent downloads on loopback: ours and libtorrent, uTP and TCP, "
                    "MB/s, CPU s/GB and peak RSS of each side (issue 8's benchmark).")
    ap.add_argument("--quick", action="store_true", help="64 MiB instead of 512 MiB")
    ap.add_argument("--only", metavar="RUN[,RUN...]",
                    help="run only these pairings, by name: " + ", ".join(r.name for r in RUNS))
    ap.add_argument("--mse", action="store_true",
                    help="instead: our peer to our peer over uTP, plain and with MSE/RC4 "
                         "(alternated, --repeat times each), and the ratio (issue 9's "
                         "benchmark)")
    ap.add_argument("--repeat", type=int, default=2, metavar="N",
                    help="with --mse: runs of each kind (default 2)")
    ap.add_argument("--profile", metavar="DIR", type=Path,
                    help="write a cProfile dump of each of our workers to DIR")
    ap.add_argument("--timeout", type=float, help="seconds per run (default: from the size)")
    ap.add_argument("--lt-buffers", type=_mib, default=0, metavar="MIB",
                    help="libtorrent's socket buffers in MiB (default 0: libtorrent's own "
                         "default, the OS's, as users run it)")
    ap.add_argument("--dir", type=Path, help="work directory (default: a temporary one)")
    ap.add_argument("--size-mib", type=int, help=argparse.SUPPRESS)     # the smoke test's tiny run
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        _worker(json.loads(args.worker))
        return 0
    size = (args.size_mib or (64 if args.quick else 512)) * MiB
    if not 1 <= args.repeat <= 20:
        ap.error("--repeat: 1..20")
    runs: tuple[Run, ...] = MSE_RUNS * args.repeat if args.mse else RUNS
    if args.only and args.mse:
        ap.error("--only and --mse do not go together")
    if args.only:
        names = {n.strip() for n in args.only.split(",")}
        unknown = names - {r.name for r in RUNS}
        if unknown:
            ap.error(f"--only: unknown run {sorted(unknown)[0]!r}")
        runs = tuple(r for r in RUNS if r.name in names)
    if any("lt" in (r.seed, r.leech) for r in runs):
        try:
            import libtorrent  # noqa: F401  # (the workers import it)
        except ImportError as exc:
            print(f"bt.bench: libtorrent is not importable ({exc}); pip install libtorrent",
                  file=sys.stderr)
            return 2
    timeout = args.timeout or 60 + size / MiB * 0.6
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
        args.profile = args.profile.resolve()
    work = Path(tempfile.mkdtemp(prefix="bt-bench-", dir=args.dir))
    try:
        bufs = f"{args.lt_buffers // MiB} MiB" if args.lt_buffers else "the OS default"
        print(f"bt.bench: {size // MiB} MiB single-file torrent on loopback, "
              f"{len(runs)} runs; libtorrent's socket buffers: {bufs}", flush=True)
        content_dir, torrent = _make_content(work, size)
        results = []
        for run in runs:
            res = _run_one(run, work, torrent, content_dir, timeout, args.lt_buffers, args.profile)
            print(f"  {run.name}: "
                  + (f"{res.mb_s(size):.1f} MB/s" if res.seconds else f"FAILED ({res.error})"),
                  flush=True)
            results.append(res)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    print(report_mse(results, size) if args.mse else report(results, size))
    return 0 if all(r.seconds is not None for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
