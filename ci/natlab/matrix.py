"""The success matrix: ``ucat --rendezvous`` through a tracker (or the DHT)
for every pair of NAT kinds (issue 5, "Tests").

For each ordered pair (A's NAT, B's NAT) both ucats start at the same
moment with the same key, meet at an opentracker on the lab's internet
(``via="tracker"``) or through a DHT node there (``via="dht"``: ``python
-m dht serve``, the only bootstrap node; ``ucat --bootstrap``),
punch, and move ``size`` random bytes each way; a pair succeeds when both
exit 0 and each side's output has the sha256 of the other side's input.
With ``offset`` seconds, B starts that long after A (negative: A after B);
``offsets`` runs every pair at each of several (the issue's sweep: -3, -1,
0, +1, +3 s) in one lab, and :func:`offset_totals` counts per offset.
Theory says every pair connects except symmetric with symmetric, which
must end with a clear error within the deadline; symmetric with a
port-restricted NAT (``restricted``, ``answering``, ``double``,
``hairpin``) connects only by birthday probing (utp._birthday).  A is
always on the lower public address (the ``hairpin`` pair shares one, and
B sits behind A's router), so (X, Y) and (Y, X) put the initiator's role
on different NATs.

Each result also has what the ucats' ``-d`` logs say: datagrams each side
sent until it connected, and for birthday probing the number of the probe
that met.  ``repeat`` runs every pair that many times (each run with a key
of its own); :func:`summarize` gives median and worst per pair, and
:func:`results_json` the machine-readable form (``matrix --json``).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import statistics
import importlib.util
import os
import re
import secrets
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from . import NAT_KINDS, Lab

_PORT_RESTRICTED = {"restricted", "answering", "double", "hairpin"}

__all__ = ["PairResult", "run_matrix", "run_offsets", "format_matrix", "punchable",
           "later_connect_time", "by_birthday", "summarize", "offset_totals", "results_json"]

_CONNECTED = re.compile(r"\+(\d+\.\d+)s connected to \S+ after (\d+\.\d+) s")
_PUNCHED = re.compile(r"punched as the \w+ after [\d.]+ s: (\d+) datagrams sent")
_BIRTHDAY = re.compile(r"birthday probing connected after .*?: probe #(\d+|\?) met; "
                       r"(\d+) datagrams sent")


def punchable(a: str, b: str) -> bool:
    """What theory says: everything but two symmetric NATs; a symmetric
    NAT meets a port-restricted one only by birthday probing
    (:func:`by_birthday`)."""
    return not (a == "symmetric" and b == "symmetric")


def by_birthday(a: str, b: str) -> bool:
    """Whether the pair can only connect by birthday probing: a symmetric
    NAT facing one that accepts only from ports it sent to."""
    return {a, b} & {"symmetric"} != set() and (a if b == "symmetric" else b) in _PORT_RESTRICTED


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
    packets_a: int | None = None    # datagrams A sent until connected (its -d log)
    packets_b: int | None = None
    probes: int | None = None       # birthday probing: the number of the probe that met

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
    """Environment for our processes in the lab (ucat, bt sessions, a DHT
    node): import utpkit's packages from where this process imports them
    (the source tree by hand, the installed wheel in CI)."""
    env = dict(os.environ)
    roots = []
    for name in ("utp", "tracker", "ucat", "dht", "bt", "_utpkit"):
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
              offset: float = 0.0, key: str | None = None,
              extra: dict[str, Sequence[str]] | None = None) -> PairResult:
    """One pair; ``extra``: more ucat arguments per side ("a", "b")."""
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
    argv = [sys.executable, "-m", "ucat", "-d", "--rendezvous", key, *where]
    procs = {}
    start = time.monotonic()
    order = (("a", a, 0.0), ("b", b, offset)) if offset >= 0 else (("b", b, 0.0), ("a", a, -offset))
    for n, (side, host, delay) in enumerate(order):
        if delay:
            time.sleep(delay)
        # Each side has ``deadline`` seconds once both run: the one that
        # starts first waits the offset longer, as a user who starts first
        # waits for the other (the offset tests who starts first, not a
        # shorter deadline).
        wait = deadline + (abs(offset) if n == 0 else 0.0)
        with open(files[side]["in"], "rb") as fin, open(files[side]["out"], "wb") as fout, \
                open(files[side]["err"], "wb") as ferr:
            more = list((extra or {}).get(side, ()))
            procs[side] = host.popen(argv + ["-w", f"{wait:g}"] + more, stdin=fin, stdout=fout,
                                     stderr=ferr, env=env, cwd=workdir)
    codes = {}
    for side, proc in procs.items():
        try:
            codes[side] = proc.wait(deadline + abs(offset) + 60)
        except subprocess.TimeoutExpired:
            proc.kill()
            codes[side] = proc.wait()
    elapsed = time.monotonic() - start
    times: dict[str, float | None] = {}
    packets: dict[str, int | None] = {}
    probes: int | None = None
    for side in ("a", "b"):
        with open(files[side]["err"], errors="replace") as f:
            text = f.read()
        m = _CONNECTED.search(text)
        times[side] = float(m.group(1)) if m else None
        m = _PUNCHED.search(text) or _BIRTHDAY.search(text)
        packets[side] = int(m.groups()[-1]) if m else None
        m = _BIRTHDAY.search(text)
        if m and m.group(1) != "?":
            probes = int(m.group(1))
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
                      times["b"], packets["a"], packets["b"], probes)


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
            # The hairpin pair shares one router: B joins A's.
            behind = lab.hosts["a-hairpin"] if side == "b" and kind == "hairpin" else None
            lab.add_host(f"{side}-{kind}", kind, loss=loss if kind != "none" else 0,
                         behind=behind)
    run = secrets.token_hex(4)
    lab.matrix_keys = {(x, y): f"natlab-{run}-{x}-{y}" for x in kinds for y in kinds}
    if via == "dht":
        return lab.start_dht_node(t, env=_python_env())
    hashes = [hashlib.sha1(k.encode()).digest() for k in [*lab.matrix_keys.values(), *extra_keys]]
    return lab.start_opentracker(t, hashes)


def run_matrix(kinds: Sequence[str] = NAT_KINDS, *, loss: int = 0, size: int = 4 << 20,
               deadline: float = 10.0, parallel: int = 3,
               pairs: Sequence[tuple[str, str]] | None = None,
               via: str = "tracker", offset: float = 0.0, repeat: int = 1,
               offsets: Sequence[float] | None = None,
               progress: Callable[[str], None] | None = None) -> list[PairResult]:
    """Build a lab, run every pair (``parallel`` at a time), tear it down.
    ``via``: meet at an opentracker ("tracker") or through a DHT node ("dht");
    ``offset``: B starts that many seconds after A (negative: before);
    ``offsets``: instead of ``offset``, every pair at each of these (the
    issue's sweep is -3, -1, 0, +1, +3 s), all in one lab;
    ``repeat``: runs of each pair (each with a key of its own).
    ``progress``, if given, is called with a line of text at each step and
    as each pair ends (the matrix itself comes only at the end)."""
    if repeat < 1:
        raise ValueError(f"repeat must be at least 1, not {repeat!r}")
    say = progress or (lambda text: None)
    chosen = list(pairs) if pairs is not None else [(x, y) for x in kinds for y in kinds]
    # The pairs expected to fail wait out the deadline: start them first.
    chosen.sort(key=lambda p: punchable(*p))
    sweep = [offset] if offsets is None else list(offsets)
    todo = [(x, y, o) for x, y in chosen for o in sweep for _ in range(repeat)]
    run = secrets.token_hex(4)
    keys = [f"natlab-{run}-run{i}" for i in range(len(todo))]
    with Lab() as lab:
        say(f"building the lab: {2 * len(kinds)} hosts behind NATs and a "
            f"{'tracker' if via == 'tracker' else 'DHT node'} ...")
        meet = (via, build_matrix_lab(lab, kinds, loss=loss, via=via, extra_keys=keys))
        workdir = lab.tempdir()
        env = _python_env()
        say(f"running {len(todo)} pairs, {parallel} at a time (a pair that cannot connect "
            f"waits out the {deadline:g} s deadline)")
        with concurrent.futures.ThreadPoolExecutor(max_workers=parallel) as pool:
            futures = [pool.submit(_run_pair, lab, meet, x, y, size=size, deadline=deadline,
                                   workdir=workdir, env=env, offset=o, key=key)
                       for (x, y, o), key in zip(todo, keys)]
            results = []
            for f in concurrent.futures.as_completed(futures):
                r = f.result()
                results.append(r)
                verdict = ("connected" if r.connected else "did not connect") + \
                    ("" if r.as_expected else " (NOT as theory says)")
                how = f" by birthday probing (probe #{r.probes})" if r.probes else ""
                at = f" at {r.offset:+g} s" if offsets is not None else ""
                say(f"{len(results):2}/{len(todo)} {r.a} -> {r.b}{at}: {verdict}{how} "
                    f"in {r.elapsed:.1f} s" + (f": {r.error}" if r.error and not r.ok else ""))
    order = {k: i for i, k in enumerate(kinds)}
    results.sort(key=lambda r: (order[r.a], order[r.b], r.offset))
    return results


def _stats(values: Sequence[float | int | None]) -> dict[str, Any] | None:
    got = [v for v in values if v is not None]
    if not got:
        return None
    return {"median": statistics.median(got), "worst": max(got), "best": min(got), "n": len(got)}


def summarize(results: Sequence[PairResult]) -> list[dict[str, Any]]:
    """Per pair (in the order first seen): runs, how many connected, and
    median / worst / best (over the runs that have the figure) of the time
    to connect (A's start to A's "connected"), the datagrams each side sent
    until then, and for birthday probing the probe that met."""
    groups: dict[tuple[str, str], list[PairResult]] = {}
    for r in results:
        groups.setdefault((r.a, r.b), []).append(r)
    out = []
    for (a, b), runs in groups.items():
        ok = [r for r in runs if r.connected]
        out.append({
            "a": a, "b": b, "runs": len(runs), "connected": len(ok),
            "expected": punchable(a, b), "birthday": by_birthday(a, b),
            "as_expected": all(r.as_expected for r in runs),
            "connect_time": _stats([r.connect_time for r in ok]),
            # From the later ucat's start: what a user starting second waits.
            "connect_time_later": _stats([later_connect_time(r) for r in ok]),
            "by_offset": {f"{o:+g}": [sum(r.connected for r in runs if r.offset == o),
                                      sum(r.offset == o for r in runs)]
                          for o in sorted({r.offset for r in runs})},
            "packets_a": _stats([r.packets_a for r in ok]),
            "packets_b": _stats([r.packets_b for r in ok]),
            "probes": _stats([r.probes for r in ok]),
            "errors": sorted({r.error for r in runs if r.error and not r.ok}),
        })
    return out


def offset_totals(results: Sequence[PairResult]) -> list[dict[str, Any]]:
    """Per start offset (ascending): runs, how many connected, how many of
    the punchable ones connected, and how many ended as theory says."""
    out = []
    for o in sorted({r.offset for r in results}):
        runs = [r for r in results if r.offset == o]
        can = [r for r in runs if punchable(r.a, r.b)]
        out.append({"offset": o, "runs": len(runs), "connected": sum(r.connected for r in runs),
                    "punchable": len(can), "punchable_connected": sum(r.connected for r in can),
                    "as_expected": sum(r.as_expected for r in runs)})
    return out


def results_json(results: Sequence[PairResult], **settings: Any) -> dict[str, Any]:
    """``matrix --json``: the settings, the per-pair summary, the totals per
    start offset and every run."""
    return {
        "settings": settings,
        "pairs": summarize(results),
        "offsets": offset_totals(results),
        "runs": [{"a": r.a, "b": r.b, "connected": r.connected, "ok": r.ok,
                  "connect_time": r.connect_time, "connect_time_b": r.connect_time_b,
                  "elapsed": round(r.elapsed, 3), "offset": r.offset,
                  "packets_a": r.packets_a, "packets_b": r.packets_b,
                  "birthday_probes": r.probes, "error": r.error} for r in results],
    }


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
          "answering": "answering", "double": "double NAT", "hairpin": "hairpin"}


def format_matrix(results: Sequence[PairResult], *, size: int, loss: int, deadline: float,
                  via: str = "tracker", offset: float | None = 0.0) -> str:
    kinds = list(dict.fromkeys([r.a for r in results] + [r.b for r in results]))
    cell = {(r.a, r.b): r for r in results}
    groups = {(g["a"], g["b"]): g for g in summarize(results)}
    repeated = any(g["runs"] > 1 for g in groups.values())
    width = 14
    how = "opentracker" if via == "tracker" else "the DHT (a python -m dht serve node)"
    lines = [f"NAT matrix: ucat --rendezvous via {how}, {size / 2**20:g} MiB each way, "
             f"sha256-checked; loss {loss}% of the datagrams at each router, each way; "
             f"deadline {deadline:g} s"
             + (f"; B starts {offset:+g} s after A" if offset else "")
             + ("; B starts at the offsets below" if offset is None else ""),
             "rows: A (the lower public address), columns: B; cell: time from start to "
             "connected on A ('b': by birthday probing), or 'no' with the time until both gave up"
             + ("; with repeats: runs connected / runs, median time" if repeated else ""),
             "".ljust(width) + "".join(_LABEL[k].ljust(width) for k in kinds)]
    for a in kinds:
        row = _LABEL[a].ljust(width)
        for b in kinds:
            r = cell.get((a, b))
            g = groups.get((a, b))
            if r is None:
                text = "-"
            elif g is not None and g["runs"] > 1:
                t = g["connect_time"]
                text = f"{g['connected']}/{g['runs']}" + (f" {t['median']:.2f}s" if t else "")
            elif r.ok:
                text = f"ok {r.connect_time:.2f}s" if r.connect_time is not None else "ok"
            elif r.delivered:
                # Every byte arrived, but a ucat then exited non-zero
                # (a reset in the closing handshake).
                text = f"data {r.connect_time:.2f}s" if r.connect_time is not None else "data"
            else:
                text = f"no {r.elapsed:.1f}s"
            if r is not None and r.probes is not None:
                text += " b"
            if r is not None and not (g["as_expected"] if g else r.as_expected):
                text += " !"
            row += text.ljust(width)
        lines.append(row.rstrip())
    if repeated or any(r.probes is not None or r.packets_a is not None for r in results):
        lines.append("per pair (median / worst over the runs that connected): time to connect; "
                     "datagrams sent until connected, A and B; birthday probes until a pair met")
        for g in groups.values():
            def fmt(st: dict[str, Any] | None, unit: str = "", digits: int = 0) -> str:
                return "-" if st is None else \
                    f"{st['median']:.{digits}f}{unit} / {st['worst']:.{digits}f}{unit}"
            per = (" (" + ", ".join(f"{o}: {c}/{n}" for o, (c, n) in g["by_offset"].items()) + ")"
                   if len(g["by_offset"]) > 1 else "")
            lines.append(f"  {g['a']:>10} -> {g['b']:<10} {g['connected']}/{g['runs']} connected{per}; "
                         f"{fmt(g['connect_time'], 's', 2)}"
                         + (f" (from the later start {fmt(g['connect_time_later'], 's', 2)})" if per else "")
                         + f"; packets {fmt(g['packets_a'])}, {fmt(g['packets_b'])}"
                         + (f"; probes {fmt(g['probes'])}" if g["probes"] else ""))
    totals = offset_totals(results)
    if len(totals) > 1:
        for t in totals:
            lines.append(f"  B starts {t['offset']:+g} s after A: {t['punchable_connected']} of "
                         f"{t['punchable']} punchable runs connected, {t['as_expected']} of "
                         f"{t['runs']} runs as theory says")
    bad = [r for r in results if not r.as_expected]
    lines.append(f"{sum(r.connected for r in results)} of {len(results)} pairs connected; "
                 f"{'all as theory says' if not bad else f'{len(bad)} NOT as theory says (!)'}")
    if any(r.delivered and not r.ok for r in results):
        lines.append("'data': every byte arrived both ways, but a ucat exited non-zero afterwards")
    for r in results:
        if not r.ok:
            at = f" at {r.offset:+g} s" if len(totals) > 1 else ""
            lines.append(f"  {r.a} -> {r.b}{at}: {r.error}")
    return "\n".join(lines)
