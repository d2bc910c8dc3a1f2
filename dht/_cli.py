"""``dht`` / ``python -m dht``: ping, get-peers, announce, serve.

ping, get-peers and announce run as read-only nodes (BEP 43): they ask
but never answer, and other nodes keep them out of their tables.

HOST:PORT is a name or an address (``[::1]:6881`` for IPv6); names are
resolved, in the family of --bind when it is given.

Exit status: 0 success; 1 the operation failed (no answer to a ping, a
refused ping, no node reachable, no node accepted an announce, get-peers
found no peer); 2 usage error.  No node is contacted that is not named with
--bootstrap (or given to ping).  Every failure is one line ``dht: ...`` on
stderr naming the node and the reason.
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import sys
from typing import Any, NoReturn

import trio

from _utpkit.addr import split_hostport
from _utpkit.excgroup import sole_leaf

from ._node import open_node

__all__ = ["main"]

_INFOHASH_HELP = ("the torrent's info hash: 40 hex digits (the sha1 of its info dictionary; "
                  "for ucat --rendezvous KEY, the sha1 of KEY)")


class _Parser(argparse.ArgumentParser):
    """Usage errors in one line (``dht: ...``), with where to find help,
    instead of the whole usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} -h)\n")


def _infohash(text: str) -> bytes:
    try:
        b = bytes.fromhex(text)
    except ValueError:
        b = b""
    if len(b) != 20:
        raise argparse.ArgumentTypeError(f"expected 40 hex digits, not {text!r}")
    return b


def _hostport(text: str) -> tuple:
    """``HOST:PORT`` or ``[V6]:PORT``, HOST a name or an address; checked
    here for its form, resolved later."""
    try:
        host, port = split_hostport(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise argparse.ArgumentTypeError(f"bad port {port!r} in {text!r}: want 0 to 65535")
    return (host, int(port))


async def _resolve(addr: tuple, family: int, what: str) -> tuple[int, tuple[str, int]]:
    """(family, (ip, port)) for a HOST:PORT from the command line."""
    try:
        infos = await trio.socket.getaddrinfo(addr[0], addr[1], family, socket.SOCK_DGRAM)
    except socket.gaierror as exc:
        if family and exc.errno in (socket.EAI_FAMILY, getattr(socket, "EAI_ADDRFAMILY", None),
                                    socket.EAI_NONAME):
            fam = "IPv6" if family == socket.AF_INET6 else "IPv4"
            raise _Fail(f"{what} {addr[0]!r} has no {fam} address (the family of --bind)") from None
        raise _Fail(f"cannot resolve {what} {addr[0]!r}: {exc.strerror}") from None
    for fam, _t, _p, _c, sa in infos:
        if fam in (socket.AF_INET, socket.AF_INET6):
            return fam, (str(sa[0]), int(sa[1]))
    raise _Fail(f"cannot resolve {what} {addr[0]!r}: no IPv4 or IPv6 address")


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


def _version() -> str:
    try:
        from importlib.metadata import version
        return version("utpkit")
    except Exception:
        return "unknown"


def _common(top: bool) -> argparse.ArgumentParser:
    # The options are accepted before and after the command; below the
    # command their defaults are suppressed so they do not undo the top's.
    def d(value: Any) -> Any:
        return value if top else argparse.SUPPRESS
    common = _Parser(add_help=False)
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
    p = _Parser(prog="dht", description="A Mainline DHT (BEP 5) node on a uTP socket.",
                parents=[_common(True)],
                epilog="exit status: 0 success; 1 the operation failed (no answer, refused, "
                       "no node reachable or accepting, get-peers found no peer); 2 usage error")
    p.add_argument("--version", action="version", version=f"dht (utpkit) {_version()}")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    sp = sub.add_parser("ping", parents=[common], help="ping a node")
    sp.add_argument("addr", type=_hostport, metavar="HOST:PORT", help="the node to ping")
    sp = sub.add_parser("get-peers", parents=[common], help="find the peers of an infohash",
                        description="Print the peers stored for INFOHASH, one HOST:PORT a line; "
                                    "exit 1 (with a line on stderr) when there is none.")
    sp.add_argument("infohash", type=_infohash, metavar="INFOHASH", help=_INFOHASH_HELP)
    sp = sub.add_parser("announce", parents=[common], help="announce ourselves for an infohash")
    sp.add_argument("infohash", type=_infohash, metavar="INFOHASH", help=_INFOHASH_HELP)
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


async def _addresses(args: Any) -> tuple[tuple[str, int], list, Any]:
    """--bind, --bootstrap and ping's HOST:PORT resolved, in one family:
    --bind's when given, else the first name's."""
    family = 0
    bind = None
    if args.bind:
        family, bind = await _resolve(args.bind, 0, "--bind address")
    boot = []
    for b in args.bootstrap or []:
        fam, addr = await _resolve(b, family, "bootstrap node")
        family = family or fam
        boot.append(addr)
    target = None
    if args.command == "ping":
        fam, target = await _resolve(args.addr, family, "node")
        family = family or fam
    if bind is None:
        bind = ("::" if family == socket.AF_INET6 else "0.0.0.0", 0)
    return bind, boot, target


def _sole(exc: BaseException) -> BaseException:
    """The one exception that matters inside trio's exception groups."""
    return sole_leaf(exc, (trio.Cancelled,))


async def _run(args: Any) -> int:
    import utp

    (host, port), boot, target = await _addresses(args)
    entered = False
    try:
        async with utp.open_endpoint(host, port) as ep:
            entered = True
            return await _command(args, ep, boot, target)
    except BaseException as exc:
        leaf = _sole(exc)
        if not entered and isinstance(leaf, OSError):
            raise _Fail(f"cannot bind to {_fmt((host, port))}: {leaf.strerror or leaf}") from None
        if leaf is not exc:
            raise leaf from None
        raise


def _unanswered(ep: Any, nodes: list, since: float) -> str:
    """Why these nodes said nothing, as far as we know."""
    refused = [n for n in nodes if ep.port_unreachable(n, since=since)]
    names = ", ".join(_fmt(n) for n in nodes)
    if refused and len(refused) == len(nodes):
        return f"{names}: ICMP port unreachable (no DHT node listens there)"
    return f"{names}: no answer" + (f" ({', '.join(_fmt(n) for n in refused)}: ICMP port "
                                    f"unreachable)" if refused else "")


async def _ping(args: Any, node: Any, ep: Any, target: tuple) -> int:
    result: list = []
    async with trio.open_nursery() as nursery:
        async def ask() -> None:
            result.append(await node.ping(target))
            nursery.cancel_scope.cancel()

        async def refused() -> None:
            await ep.wait_port_unreachable(target)
            nursery.cancel_scope.cancel()
        nursery.start_soon(ask)
        nursery.start_soon(refused)
    if not result:
        raise _Fail(f"node {_fmt(target)} refused the ping: ICMP port unreachable "
                    f"(nothing listens on that port)")
    nid = result[0]
    if nid is None:
        raise _Fail(f"no answer from {_fmt(target)} (it may be down, or not a DHT node)")
    _out(args, f"{_fmt(target)} id {nid.hex()}", {"address": _fmt(target), "id": nid.hex()})
    return 0


async def _command(args: Any, ep: Any, boot: list, target: Any) -> int:
    # ping, get-peers and announce are short-lived: they run read-only
    # (BEP 43), so other nodes do not put a soon-dead node in their tables.
    serving = args.command == "serve"
    started = trio.current_time()
    if serving or not boot:
        return await _with_node(args, ep, boot, target, started)
    result: list[int] = []
    async with trio.open_nursery() as nursery:
        async def work() -> None:
            result.append(await _with_node(args, ep, boot, target, started))
            nursery.cancel_scope.cancel()

        async def all_refused() -> None:
            # Every bootstrap node answered with ICMP port unreachable:
            # nothing will come of waiting for the bootstrap to time out.
            for b in boot:
                await ep.wait_port_unreachable(b, since=started)
            raise _Fail(f"no DHT node answered: {_unanswered(ep, boot, started)}")
        nursery.start_soon(work)
        if args.command != "ping":
            nursery.start_soon(all_refused)
    return result[0]


async def _with_node(args: Any, ep: Any, boot: list, target: Any, started: float) -> int:
    serving = args.command == "serve"
    async with open_node(ep, bootstrap=boot, state_file=args.state, read_only=not serving,
                         wait_bootstrap=not serving) as node:
        if serving:
            return await _serve(args, ep, node)
        if args.command == "ping":
            return await _ping(args, node, ep, target)
        if node.statistics()["nodes"] == {k: 0 for k in node.statistics()["nodes"]}:
            if not boot:
                raise _Fail("no DHT node answered (give --bootstrap HOST:PORT)")
            raise _Fail(f"no DHT node answered: {_unanswered(ep, boot, started)}")
        if args.command == "get-peers":
            search = node.get_peers(args.infohash)
            peers = []
            async for peer in search:
                peers.append(peer)
                if not args.json:
                    print(_fmt(peer), flush=True)
            queried = sum(r.queried for r in search.lookups)
            if args.json:
                print(json.dumps({
                    "infohash": args.infohash.hex(), "peers": [_fmt(p) for p in peers],
                    "nodes": [{"id": i.hex(), "address": _fmt(a)} for i, a in search.nodes],
                    "queried": queried}), flush=True)
            if not peers:
                raise _Fail(f"no peers for {args.infohash.hex()}: asked {queried} "
                            f"node{'s' if queried != 1 else ''}, none had any")
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
        what = {"ping": f"no answer from {args.addr[0]}:{args.addr[1]}",
                "get-peers": "the get-peers lookup did not finish",
                "announce": "the announce did not finish"}.get(args.command, "no result")
        raise _Fail(f"{what} within {timeout:g} s (--timeout)")

    try:
        return trio.run(run)
    except KeyboardInterrupt:
        return 130
    except BaseException as exc:
        leaf = _sole(exc)
        if isinstance(leaf, _Fail):
            print(f"dht: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, OSError):
            print(f"dht: {leaf.strerror or leaf}" if leaf.errno else f"dht: {leaf}", file=sys.stderr)
            return 1
        if isinstance(leaf, KeyboardInterrupt):
            return 130
        raise
