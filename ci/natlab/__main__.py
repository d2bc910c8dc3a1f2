"""python -m ci.natlab matrix [--via tracker|dht] [--loss N] [--size BYTES] [--deadline S]
    [--kinds K,K|all] [--offset SECONDS | --offsets=S,S,..] [--repeat N] [--json]
python -m ci.natlab magnet [--size BYTES] [--repeat N] [--json]
python -m ci.natlab cleanup

``matrix`` builds a NAT lab (as root), runs ucat --rendezvous for every pair
of NAT kinds (meeting at an opentracker, or through a DHT node with --via
dht), prints the success matrix and exits 0 when every pair did
what theory says.  ``--repeat N`` runs every pair N times (median and worst
per pair); ``--json`` prints the results as JSON instead (per pair:
connected or not, time to connect, datagrams sent until connected, birthday
probes until a pair met; and every run).  ``--offsets=-3,-1,0,1,3`` runs
every pair at each start offset (with ``=``: the list starts with a minus)
and adds the totals per offset.  ``magnet`` downloads from a magnet link
across two port-restricted NATs with only a DHT node between the peers
and prints the times to metadata, first byte and finish (median and
worst over ``--repeat`` runs).  ``cleanup`` deletes namespaces
left by killed runs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from . import ALL_NAT_KINDS, NAT_KINDS, can_build, cleanup_stale

_CHECKOUT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _prefer_installed_packages() -> str | None:
    """``python -m ci.natlab`` runs in the checkout (ci/ is not installed),
    and so puts the checkout first on sys.path, where utp has no compiled
    module.  Move the checkout behind the installed packages, so this
    process and the lab's ucats (their PYTHONPATH follows where utp is
    found here) use the installed utpkit.  Returns why utp cannot be
    loaded, or None."""
    here = [p for p in sys.path if os.path.abspath(p or os.curdir) == _CHECKOUT]
    if here:
        sys.path[:] = [p for p in sys.path if p not in here] + here
    try:
        import utp  # noqa: F401
    except ImportError as exc:
        return (f"cannot load utp with {sys.executable}: {exc}\n"
                f"natlab: install utpkit into this interpreter's environment first "
                f"(.venv/bin/pip install .) and run it as .venv/bin/python -m ci.natlab")
    return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ci.natlab", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    m = sub.add_parser("matrix", help="run the NAT success matrix")
    m.add_argument("--loss", type=int, default=0,
                   help="random loss on each router: this percent of the datagrams it "
                        "forwards, each way, one by one (the lab's offloads are off, so UDP "
                        "GSO batches are cut into datagrams before the router)")
    m.add_argument("--size", type=int, default=4 << 20, help="bytes each way (default 4 MiB)")
    m.add_argument("--deadline", type=float, default=10.0,
                   help="ucat -w: seconds to connect once both peers run (the one started first "
                        "waits the offset longer)")
    m.add_argument("--kinds", default=",".join(NAT_KINDS),
                   help=f"comma-separated NAT kinds of {','.join(ALL_NAT_KINDS)}, or 'all' "
                        f"(default {','.join(NAT_KINDS)})")
    m.add_argument("--offset", type=float, default=0.0,
                   help="start B this many seconds after A (negative: A after B)")
    m.add_argument("--offsets", default="",
                   help="comma-separated offsets: every pair at each (write --offsets=-3,-1,0,1,3)")
    m.add_argument("--via", choices=("tracker", "dht"), default="tracker",
                   help="meet at an opentracker (default) or through a DHT node on the lab's internet")
    m.add_argument("--parallel", type=int, default=3, help="pairs run at once")
    m.add_argument("--repeat", type=int, default=1,
                   help="runs of every pair (median and worst per pair; default 1)")
    m.add_argument("--pairs", default="",
                   help="only these ordered pairs, e.g. symmetric:restricted,answering:symmetric")
    m.add_argument("--json", action="store_true", help="print the results as JSON")
    g = sub.add_parser("magnet", help="a magnet download across two NATs with only a DHT node "
                                      "between the peers: times to metadata, first byte, finish")
    g.add_argument("--size", type=int, default=4 << 20, help="bytes (default 4 MiB)")
    g.add_argument("--repeat", type=int, default=5, help="runs, each in a fresh lab (default 5)")
    g.add_argument("--json", action="store_true", help="print every run as JSON")
    sub.add_parser("cleanup", help="delete namespaces of lab runs that were killed")
    args = parser.parse_args(argv)
    why = can_build()
    if why:
        print(f"natlab: {why}", file=sys.stderr)
        return 1
    if args.command == "cleanup":
        for name in cleanup_stale():
            print(f"deleted {name}")
        return 0
    why = _prefer_installed_packages()
    if why:
        print(f"natlab: {why}", file=sys.stderr)
        return 1
    if args.command == "magnet":
        if args.repeat < 1 or args.size < 1:
            parser.error("--repeat and --size must be at least 1")
        from .magnet import format_magnet, run_magnet
        runs = run_magnet(args.size, repeat=args.repeat,
                          progress=lambda text: print(text, file=sys.stderr, flush=True))
        print(json.dumps(runs, indent=1) if args.json else format_magnet(runs))
        for r in runs:
            for role, (code, err) in r["exits"].items():
                if code or err.strip():
                    print(f"the {role} exited with status {code}:\n{err}", file=sys.stderr)
        return 0 if all(r["sha256_ok"] and not any(c for c, _ in r["exits"].values())
                        for r in runs) else 1
    from .matrix import format_matrix, results_json, run_matrix

    kinds = ([*ALL_NAT_KINDS] if args.kinds.strip() == "all"
             else [k.strip() for k in args.kinds.split(",") if k.strip()])
    for k in kinds:
        if k not in ALL_NAT_KINDS:
            parser.error(f"unknown NAT kind {k!r}; choose from {','.join(ALL_NAT_KINDS)}")
    started = time.monotonic()

    def progress(text: str) -> None:
        print(f"[{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    pairs = None
    if args.pairs.strip():
        pairs = []
        for item in args.pairs.split(","):
            a, _, b = item.strip().partition(":")
            if a not in kinds or b not in kinds:
                parser.error(f"--pairs {item!r}: both kinds must be among --kinds "
                             f"({','.join(kinds)})")
            pairs.append((a, b))
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    offsets = None
    if args.offsets.strip():
        try:
            offsets = [float(x) for x in args.offsets.split(",") if x.strip()]
        except ValueError:
            parser.error(f"--offsets {args.offsets!r}: comma-separated seconds, e.g. --offsets=-3,0,3")
    results = run_matrix(kinds, loss=args.loss, size=args.size, deadline=args.deadline,
                         parallel=args.parallel, via=args.via, progress=progress,
                         offset=args.offset, repeat=args.repeat, pairs=pairs, offsets=offsets)
    if args.json:
        print(json.dumps(results_json(results, via=args.via, loss=args.loss, size=args.size,
                                      deadline=args.deadline,
                                      offset=args.offset if offsets is None else offsets,
                                      repeat=args.repeat), indent=1))
    else:
        print(format_matrix(results, size=args.size, loss=args.loss, deadline=args.deadline,
                            via=args.via, offset=args.offset if offsets is None else None))
    return 0 if all(r.as_expected for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
