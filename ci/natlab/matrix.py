"""The success matrix: ``ucat --rendezvous`` through a tracker (or the DHT)
for every pair of NAT kinds (issue 5, "Tests").

For each ordered pair (A's NAT, B's NAT) both ucats start at the same
moment with the same key, meet at an opentracker on the lab's internet
(``via="tracker"``) or through a DHT node there (``via="dht"``: ``python
-m dht serve``, the only bootstrap node; ``ucat --bootstrap``),
punch, and move ``size`` random bytes each way; a pair succeeds when both
exit 0 and each side's output has the sha256 of the other side's input.
With ``offset`` seconds, B starts that long after A (negative: A after B).
Theory says every pair connects except symmetric with a port-restricted
NAT (``restricted``, ``answering``) and symmetric with symmetric: those must end with a clear error within the
deadline.  A is always on the lower public address, so (X, Y) and (Y, X)
put the initiator's role on different NATs.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import importlib.util
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from . import NAT_KINDS, Lab

_PORT_RESTRICTED = {"restricted", "answering"}

__all__ = ["PairResult", "run_matrix", "run_offsets", "format_matrix", "punchable",
           "later_connect_time"]

_CONNECTED = re.compile(r"\+(\d+\.\d+)s connected to \S+ after (\d+\.\d+) s")


def punchable(a: str, b: str) -> bool:
    """What theory says: a symmetric NAT meets only peers that accept from
    any port (no NAT, full cone)."""
    if "symmetric" in (a, b):
        other = b if a == "symmetric" else a
        return other not in _PORT_RESTRICTED and other != "symmetric"
    return True


@dataclass
class PairResult:
    a: str
    b: str
    ok: bool
    connect_time: float | None      # A's start to A's connected, seconds
    elapsed: float                  # until both ucats exited
    error: str = ""
    delivered: bool = False         # each side's output is the other's input
    offset: float = 0.0             # B started this long after A (negative: before)
    connect_time_b: float | None = None  # B's start to B's connected, seconds

    @property
    def connected(self) -> bool:
        return self.ok or self.delivered

    @property
    def as_expected(self) -> bool:
        """Connected (and moved every byte) exactly where theory says it
        can; a reset in the closing handshake after that is shown as
        'data' in the matrix, not counted against the punching."""
        return self.connected == punchable(self.a, self.b)


def _python_env() -> dict[str, str]:
    """Environment for ucat in the lab: import utp, tracker and ucat from
    where this process imports them (the source tree by hand, the installed
    wheel in CI)."""
    env = dict(os.environ)
    roots = []
    for name in ("utp", "tracker", "ucat", "dht"):
        spec = importlib.util.find_spec(name)
        if spec is not None and spec.origin:
            root = os.path.dirname(os.path.dirname(spec.origin))
            if root not in roots:
                roots.append(root)
    if roots:
        env["PYTHONPATH"] = os.pathsep.join(roots + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def _last_line(path: str) -> str:
    try:
        with open(path, errors="replace") as f:
            lines = [line.strip() for line in f if line.strip()]
    except OSError:
        return ""
    errors = [line for line in lines if not re.match(r"ucat: \+\d", line)]
    return (errors or lines or [""])[-1]


def _run_pair(lab: Lab, meet: tuple[str, tuple[str, int]], a_kind: str, b_kind: str, *, size: int,
              deadline: float, workdir: str, env: dict[str, str],
              offset: float = 0.0, key: str | None = None) -> PairResult:
    a, b = lab.hosts[f"a-{a_kind}"], lab.hosts[f"b-{b_kind}"]
    if key is None:
        key = lab.matrix_keys[(a_kind, b_kind)]
    tag = f"{a_kind}-{b_kind}-{secrets.token_hex(3)}"
    files = {}
    for side in ("a", "b"):
        files[side] = {name: os.path.join(workdir, f"{tag}.{side}.{name}")
                       for name in ("in", "out", "err")}
        with open(files[side]["in"], "wb") as f:
            f.write(os.urandom(size))
    via, (ip, port) = meet
    where = (["--tracker", f"udp://{ip}:{port}"] if via == "tracker"
             else ["--bootstrap", f"{ip}:{port}"])
    argv = [sys.executable, "-m", "ucat", "-d", "--rendezvous", key, *where, "-w", f"{deadline:g}"]
    procs = {}
    start = time.monotonic()
    order = (("a", a, 0.0), ("b", b, offset)) if offset >= 0 else (("b", b, 0.0), ("a", a, -offset))
    for side, host, delay in order:
        if delay:
            time.sleep(delay)
        with open(files[side]["in"], "rb") as fin, open(files[side]["out"], "wb") as fout, \
                open(files[side]["err"], "wb") as ferr:
            procs[side] = host.popen(argv, stdin=fin, stdout=fout, stderr=ferr, env=env, cwd=workdir)
    codes = {}
    for side, proc in procs.items():
        try:
            codes[side] = proc.wait(deadline + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[side] = proc.wait()
    elapsed = time.monotonic() - start
    times: dict[str, float | None] = {}
    for side in ("a", "b"):
        with open(files[side]["err"], errors="replace") as f:
            m = _CONNECTED.search(f.read())
            times[side] = float(m.group(1)) if m else None
    connect_time = times["a"]
    error = ""
    delivered = True
    for src, dst in (("a", "b"), ("b", "a")):
        with open(files[src]["in"], "rb") as f1, open(files[dst]["out"], "rb") as f2:
            if hashlib.sha256(f1.read()).digest() != hashlib.sha256(f2.read()).digest():
                delivered = False
                error = f"{dst.upper()} received other bytes than {src.upper()} sent"
    ok = codes["a"] == 0 and codes["b"] == 0 and delivered
    if codes["a"] or codes["b"]:
        error = "; ".join(f"{side.upper()} exit {codes[side]}: {_last_line(files[side]['err'])}"
                          for side in ("a", "b") if codes[side] != 0)
    return PairResult(a_kind, b_kind, ok, connect_time, elapsed, error, delivered, offset,
                      times["b"])


def build_matrix_lab(lab: Lab, kinds: Sequence[str], *, loss: int = 0,
                     via: str = "tracker", extra_keys: Sequence[str] = ()) -> tuple[str, int]:
    """Hosts ``a-KIND`` and ``b-KIND`` for each kind and a tracker (or a DHT
    node, ``via="dht"``), which also accepts ``extra_keys``; returns its
    address.  The a-hosts get the lower
    public addresses."""
    if via not in ("tracker", "dht"):
        raise ValueError(f"via is 'tracker' or 'dht', not {via!r}")
    t = lab.add_host("tracker" if via == "tracker" else "dht")
    for side in ("a", "b"):
        for kind in kinds:
            lab.add_host(f"{side}-{kind}", kind, loss=loss if kind != "none" else 0)
    run = secrets.token_hex(4)
    lab.matrix_keys = {(x, y): f"natlab-{run}-{x}-{y}" for x in kinds for y in kinds}
    if via == "dht":
        return lab.start_dht_node(t, env=_python_env())
    hashes = [hashlib.sha1(k.encode()).digest() for k in [*lab.matrix_keys.values(), *extra_keys]]
    return lab.start_opentracker(t, hashes)


def run_matrix(kinds: Sequence[str] = NAT_KINDS, *, loss: int = 0, size: int = 4 << 20,
               deadline: float = 10.0, parallel: int = 3,
               pairs: Sequence[tuple[str, str]] | None = None,
               via: str = "tracker", offset: float = 0.0,
               progress: Callable[[str], None] | None = None) -> list[PairResult]:
    """Build a lab, run every pair (``parallel`` at a time), tear it down.
    ``via``: meet at an opentracker ("tracker") or through a DHT node ("dht");
    ``offset``: B starts that many seconds after A (negative: before).
    ``progress``, if given, is called with a line of text at each step and
    as each pair ends (the matrix itself comes only at the end)."""
    say = progress or (lambda text: None)
    with Lab() as lab:
        say(f"building the lab: {2 * len(kinds)} hosts behind NATs and a "
            f"{'tracker' if via == 'tracker' else 'DHT node'} ...")
        meet = (via, build_matrix_lab(lab, kinds, loss=loss, via=via))
        workdir = lab.tempdir()
        env = _python_env()
        todo = list(pairs) if pairs is not None else [(x, y) for x in kinds for y in kinds]
        # The pairs expected to fail wait out the deadline: start them first.
        todo.sort(key=lambda p: punchable(*p))
        say(f"running {len(todo)} pairs, {parallel} at a time (a pair that cannot connect "
            f"waits out the {deadline:g} s deadline)")
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(_run_pair, lab, meet, x, y, size=size, deadline=deadline,
                                   workdir=workdir, env=env, offset=offset) for x, y in todo]
            results = []
            for f in concurrent.futures.as_completed(futures):
                r = f.result()
                results.append(r)
                verdict = ("connected" if r.connected else "did not connect") + \
                    ("" if r.as_expected else " (NOT as theory says)")
                say(f"{len(results):2}/{len(todo)} {r.a} -> {r.b}: {verdict} "
                    f"in {r.elapsed:.1f} s" + (f": {r.error}" if r.error and not r.ok else ""))
    order = {k: i for i, k in enumerate(kinds)}
    results.sort(key=lambda r: (order[r.a], order[r.b]))
    return results


def run_offsets(kinds: Sequence[str], jobs: Sequence[tuple[str, str, float]], *, loss: int = 0,
                size: int = 1 << 20, deadline: float = 10.0, parallel: int = 3,
                via: str = "tracker") -> list[PairResult]:
    """Run each ``(a_kind, b_kind, offset)`` of ``jobs`` in one lab (each
    with a key of its own, so one pair of hosts can run many times), in
    the order given; for start-offset sweeps and repetitions."""
    run = secrets.token_hex(4)
    keys = [f"natlab-{run}-job{i}" for i in range(len(jobs))]
    with Lab() as lab:
        meet = (via, build_matrix_lab(lab, kinds, loss=loss, via=via, extra_keys=keys))
        workdir = lab.tempdir()
        env = _python_env()
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(_run_pair, lab, meet, x, y, size=size, deadline=deadline,
                                   workdir=workdir, env=env, offset=o, key=key)
                       for (x, y, o), key in zip(jobs, keys)]
            return [f.result() for f in futures]


def later_connect_time(r: PairResult) -> float | None:
    """Seconds from the later ucat's start to its "connected": what a user
    who starts second waits (the earlier one also waits for the peer)."""
    return r.connect_time_b if r.offset >= 0 else r.connect_time


_LABEL = {"none": "none", "full": "full cone", "restricted": "port-restr.", "symmetric": "symmetric",
          "answering": "answering"}


def format_matrix(results: Sequence[PairResult], *, size: int, loss: int, deadline: float,
                  via: str = "tracker", offset: float = 0.0) -> str:
    kinds = list(dict.fromkeys([r.a for r in results] + [r.b for r in results]))
    cell = {(r.a, r.b): r for r in results}
    width = 14
    how = "opentracker" if via == "tracker" else "the DHT (a python -m dht serve node)"
    lines = [f"NAT matrix: ucat --rendezvous via {how}, {size / 2**20:g} MiB each way, "
             f"sha256-checked; loss {loss}% of the datagrams at each router, each way; "
             f"deadline {deadline:g} s"
             + (f"; B starts {offset:+g} s after A" if offset else ""),
             "rows: A (the lower public address), columns: B; cell: time from start to "
             "connected on A, or 'no' with the time until both gave up",
             "".ljust(width) + "".join(_LABEL[k].ljust(width) for k in kinds)]
    for a in kinds:
        row = _LABEL[a].ljust(width)
        for b in kinds:
            r = cell.get((a, b))
            if r is None:
                text = "-"
            elif r.ok:
                text = f"ok {r.connect_time:.2f}s" if r.connect_time is not None else "ok"
            elif r.delivered:
                # Every byte arrived, but a ucat then exited non-zero
                # (a reset in the closing handshake).
                text = f"data {r.connect_time:.2f}s" if r.connect_time is not None else "data"
            else:
                text = f"no {r.elapsed:.1f}s"
            if r is not None and not r.as_expected:
                text += " !"
            row += text.ljust(width)
        lines.append(row.rstrip())
    bad = [r for r in results if not r.as_expected]
    lines.append(f"{sum(r.connected for r in results)} of {len(results)} pairs connected; "
                 f"{'all as theory says' if not bad else f'{len(bad)} NOT as theory says (!)'}")
    if any(r.delivered and not r.ok for r in results):
        lines.append("'data': every byte arrived both ways, but a ucat exited non-zero afterwards")
    for r in results:
        if not r.ok:
            lines.append(f"  {r.a} -> {r.b}: {r.error}")
    return "\n".join(lines)
