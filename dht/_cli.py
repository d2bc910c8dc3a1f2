"""``dht`` / ``python -m dht``: ping, get-peers, announce, serve.

ping, get-peers and announce run as read-only nodes (BEP 43): they ask
but never answer, and other nodes keep them out of their tables.

Exit status: 0 success; 1 the operation failed (no answer to a ping, no
node reachable, no node accepted an announce); 2 usage error.  No node is
contacted that is not named with --bootstrap (or given to ping).
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from typing import Any

import trio

import utp

from ._node import open_node, parse_hostport

__all__ = ["main"]


def _infohash(text: str) -> bytes:
    try:
        b = bytes.fromhex(text)
    except ValueError:
        b = b""
    if len(b) != 20:
        raise argparse.ArgumentTypeError(f"expected 40 hex digits, not {text!r}")
    return b


def _hostport(text: str) -> tuple:
    try:
        return parse_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _minutes(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        v = -1.0
    if not v > 0:
        raise argparse.ArgumentTypeError(f"expected a positive number of minutes, not {text!r}")
    return v


def _fmt(addr: tuple) -> str:
    return f"[{addr[0]}]:{addr[1]}" if ":" in addr[0] else f"{addr[0]}:{addr[1]}"


def _common(top: bool) -> argparse.ArgumentParser:
    # The options are accepted before and after the command; below the
    # command their defaults are suppressed so they do not undo the top's.
    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--bind", type=_hostport, default=d(None), metavar="HOST:PORT",
                        help="local address of the UDP socket (default 0.0.0.0:0)")
    common.add_argument("--bootstrap", type=_hostport, action="append", default=d(None),
                        metavar="HOST:PORT", help="a node to start from (repeatable); none by default")
    common.add_argument("--json", action="store_true", default=d(False), help="print JSON")
    common.add_argument("--state", default=d(None), metavar="FILE",
                        help="keep the node id and routing table in FILE")
    common.add_argument("--timeout", type=float, default=d(None), metavar="SECONDS",
                        help="give up after this long (default 60; serve: never)")
    return common


def _parser() -> argparse.ArgumentParser:
    common = _common(False)
    p = argparse.ArgumentParser(prog="dht", description="A Mainline DHT (BEP 5) node on a uTP socket.",
                                parents=[_common(True)])
    sub = p.add_subparsers(dest="command", required=True)
    sp = sub.add_parser("ping", parents=[common], help="ping a node")
    sp.add_argument("addr", type=_hostport, metavar="HOST:PORT")
    sp = sub.add_parser("get-peers", parents=[common], help="find the peers of an infohash")
    sp.add_argument("infohash", type=_infohash)
    sp = sub.add_parser("announce", parents=[common], help="announce ourselves for an infohash")
    sp.add_argument("infohash", type=_infohash)
    sp.add_argument("--port", type=int, default=None,
                    help="the port to announce (default: implied, the socket's own port)")
    sp = sub.add_parser("serve", parents=[common], help="run a node (e.g. a lab's bootstrap node)",
                        description="Run a node until SIGTERM or SIGINT.  SIGUSR1 prints its "
                                    "counters (queries, answers, rate-limited and dropped datagrams, "
                                    "the uTP engine's refusals) to stdout; so does --stats N every N "
                                    "minutes.")
    sp.add_argument("--stats", type=_minutes, default=None, metavar="N",
                    help="print the counters every N minutes (fractions allowed)")
    return p


class _Fail(Exception):
    pass


def _out(args: Any, text: str, doc: dict) -> None:
    if args.json:
        print(json.dumps(doc), flush=True)
    else:
        print(text, flush=True)


async def _run(args: Any) -> int:
    host, port = args.bind if args.bind else ("0.0.0.0", 0)
    boot = args.bootstrap or []
    async with utp.open_endpoint(host, port) as ep:
        # ping, get-peers and announce are short-lived: they run read-only
        # (BEP 43), so other nodes do not put a soon-dead node in their tables.
        serving = args.command == "serve"
        async with open_node(ep, bootstrap=boot, state_file=args.state, read_only=not serving,
                             wait_bootstrap=not serving) as node:
            if args.command == "serve":
                return await _serve(args, ep, node)
            if args.command == "ping":
                nid = await node.ping(args.addr)
                if nid is None:
                    raise _Fail(f"no answer from {_fmt(args.addr)}")
                _out(args, f"{_fmt(args.addr)} id {nid.hex()}",
                     {"address": _fmt(args.addr), "id": nid.hex()})
                return 0
            if node.statistics()["nodes"] == {k: 0 for k in node.statistics()["nodes"]}:
                raise _Fail("no DHT node answered" + ("" if boot else " (give --bootstrap HOST:PORT)"))
            if args.command == "get-peers":
                search = node.get_peers(args.infohash)
                peers = []
                async for peer in search:
                    peers.append(peer)
                    if not args.json:
                        print(_fmt(peer), flush=True)
                if args.json:
                    print(json.dumps({
                        "infohash": args.infohash.hex(), "peers": [_fmt(p) for p in peers],
                        "nodes": [{"id": i.hex(), "address": _fmt(a)} for i, a in search.nodes],
                        "queried": sum(r.queried for r in search.lookups)}), flush=True)
                return 0
            # announce
            res = await node.announce(args.infohash, port=args.port)
            if res.accepted == 0:
                why = "; ".join(res.errors[:3]) or "no node gave us a token"
                raise _Fail(f"no node accepted the announce ({why})")
            _out(args, f"announced to {res.accepted} of {len(res.nodes)} closest nodes",
                 {"infohash": args.infohash.hex(), "accepted": res.accepted,
                  "nodes": [_fmt(a) for _, a in res.nodes], "errors": list(res.errors)})
            return 0
    return 0


# What `dht serve` prints on SIGUSR1 / --stats: the DHT core's counters
# (answers, rate limiting, malformed input), its queue on the shared socket
# (drops when it overflows) and the uTP engine's refusals.
_ENGINE_KEYS = ("syn_invalid", "syn_refused", "syn_cookies", "unauth_limited", "resets_limited",
                "drop_malformed", "drop_unknown", "not_utp")


def _counters(ep: Any, node: Any) -> dict:
    st = node.statistics()
    engine = ep.statistics().get("engine", {})
    return {"event": "stats", "counters": dict(sorted(st.get("counters", {}).items())),
            "nodes": st.get("nodes"), "queue": st.get("queue"), "send_backlog": st.get("send_backlog"),
            "send_errors": st.get("send_errors"), "engine": {k: engine.get(k) for k in _ENGINE_KEYS}}


def _print_counters(args: Any, ep: Any, node: Any, why: str) -> None:
    doc = _counters(ep, node)
    doc["why"] = why
    if args.json:
        print(json.dumps(doc, default=str), flush=True)
        return
    parts = [f"{k}={v}" for k, v in doc["counters"].items()]
    q = doc["queue"] or {}
    print(f"dht: stats ({why}): " + " ".join(parts), flush=True)
    print(f"dht: stats ({why}): nodes={doc['nodes']} queue_received={q.get('received')} "
          f"queue_dropped={q.get('dropped')} send_backlog={doc['send_backlog']} "
          f"send_errors={doc['send_errors']} " +
          " ".join(f"engine_{k}={v}" for k, v in doc["engine"].items()), flush=True)


async def _serve(args: Any, ep: Any, node: Any) -> int:
    """Serve until SIGTERM/SIGINT (ending the block normally, so --state is
    saved); print the counters on SIGUSR1 and every --stats minutes."""
    local = ep.local_address
    sigs = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    with trio.open_signal_receiver(*sigs) as signals:
        _out(args, f"dht: serving on {_fmt(local)} id {node.node_id.hex()}",
             {"event": "serving", "address": _fmt(local), "id": node.node_id.hex()})
        async with trio.open_nursery() as nursery:
            if args.stats:
                async def every() -> None:
                    while True:
                        await trio.sleep(args.stats * 60)
                        _print_counters(args, ep, node, f"every {args.stats:g} min")
                nursery.start_soon(every)
            async for signum in signals:
                if signum == signal.SIGUSR1:
                    _print_counters(args, ep, node, "SIGUSR1")
                    continue
                break
            nursery.cancel_scope.cancel()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    timeout = args.timeout if args.timeout is not None else (None if args.command == "serve" else 60.0)

    async def run() -> int:
        if timeout is None:
            return await _run(args)
        with trio.move_on_after(timeout):
            return await _run(args)
        raise _Fail(f"timed out after {timeout:g} s")

    try:
        return trio.run(run)
    except _Fail as exc:
        print(f"dht: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"dht: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
