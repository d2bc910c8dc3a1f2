"""``utp-bench [<benchmark>] [options]`` (or ``python -m utp.bench``): pick a benchmark by name
(``loopback`` when none is named)."""

from __future__ import annotations

import sys

BENCHMARKS = {
    "loopback": ("utp.bench.loopback",
                 "real sockets: raw UDP (no GSO/GRO) vs ucat->ucat (uTP, GSO/GRO) vs TCP (MB/s, CPU s/GB), "
                 "memory per idle connection, round-trip latency (the default)"),
    "sim": ("utp.bench.sim",
            "the engine over the simulated network: goodput, retransmissions "
            "vs losses, queueing delay (virtual time, ~10 s of real time)"),
    "interop": ("utp.bench.interop",
                "real clients (libtorrent, Transmission) over uTP: MB/s, retransmissions, "
                "timeouts, receiver socket drops, each direction; --loss N through the NAT lab"),
    "dht": ("dht.bench",
            "DHT lookups (500 simulated nodes, loopback), memory per stored peer, "
            "queries per second (the same as python -m dht.bench)"),
    "flood": ("utp.bench.flood",
              "a listener under SYN floods of 1k/10k/100k per second from many 127/8 "
              "sources: legitimate connect latency p50/p99, memory, reply ratio"),
}


def usage() -> str:
    lines = ["usage: utp-bench <benchmark> [options]", "", "benchmarks:"]
    for name, (_, text) in BENCHMARKS.items():
        lines.append(f"  {name:8} {text}")
    lines.append("")
    lines.append("utp-bench <benchmark> --help shows a benchmark's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if args and args[0] in ("-h", "--help", "help"):
        print(usage())
        return 0
    if not args or args[0].startswith("-"):
        args = ["loopback", *args]
    name, rest = args[0], args[1:]
    if name not in BENCHMARKS:
        print(f"utp.bench: unknown benchmark {name!r}\n", file=sys.stderr)
        print(usage(), file=sys.stderr)
        return 2
    import importlib
    module = importlib.import_module(BENCHMARKS[name][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
