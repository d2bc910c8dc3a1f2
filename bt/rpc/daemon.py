"""``bt daemon`` (and ``python -m bt daemon``): one BitTorrent session
driven over aria2's JSON-RPC, with the status page.

    bt daemon [-d DIR] [--port N] [--bind ADDR] [--no-utp | --no-tcp]
              [--rpc-listen HOST:PORT] [--rpc-secret TOKEN] [--rpc-allow-origin-all]
              [--rpc-max-request-size N] [--max-ws-clients N]
              [--save-session FILE] [--input-file FILE] [--save-session-interval S]
              [--max-upload-rate RATE] [--max-download-rate RATE]
              [--on-download-start CMD] [--on-download-pause CMD] [--on-download-stop CMD]
              [--on-download-complete CMD] [--on-download-error CMD]
              [--on-bt-download-complete CMD] [--hook-timeout S]

The RPC listens on 127.0.0.1:6800 (aria2's port) unless ``--rpc-listen``
names another address.  ``--input-file`` adds the downloads of an aria2
session file at start (each with its gid); ``--save-session`` writes the
live downloads there on ``aria2.saveSession``, every
``--save-session-interval`` seconds if set, and on exit (see
:mod:`bt.rpc.sessionfile`).  Each download event is one line on stderr.
SIGINT/SIGTERM, ``aria2.shutdown`` and ``aria2.forceShutdown`` end it
cleanly (connections closed, resume files and the session file written).
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass
from typing import Any

from _utpkit.addr import parse_hostport

__all__ = ["add_parser", "run", "serve_daemon", "Running", "daemon_args"]

DEFAULT_RPC = ("127.0.0.1", 6800)


def _listen(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text, bare_ipv6=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    return host or "127.0.0.1", port


def add_parser(sub: Any) -> None:
    from .._cli_run import add_dht_options, add_hook_options, add_rate_and_transport_options
    p = sub.add_parser("daemon", help="run a session driven over aria2's JSON-RPC (and a status page)")
    p.add_argument("-d", "--dir", default=".", metavar="DIR",
                   help="the default download directory (a download's dir option overrides it)")
    p.add_argument("--port", type=int, default=0, metavar="N",
                   help="the UDP (uTP) and TCP port for peers (default: any free one)")
    p.add_argument("--bind", default=None, metavar="ADDR",
                   help="the local address for peers (default: all)")
    add_rate_and_transport_options(p)
    add_dht_options(p)
    p.add_argument("--rpc-listen", type=_listen, default=DEFAULT_RPC, metavar="HOST:PORT",
                   help="where the JSON-RPC and the status page listen (default: 127.0.0.1:6800)")
    p.add_argument("--rpc-secret", default=None, metavar="TOKEN",
                   help='refuse every call whose first parameter is not "token:TOKEN"')
    p.add_argument("--rpc-allow-origin-all", action="store_true",
                   help="send CORS headers and accept WebSockets from pages of any origin")
    p.add_argument("--rpc-max-request-size", type=int, default=2 * 1024 * 1024, metavar="BYTES",
                   help="the largest request body or WebSocket message (default: 2 MiB)")
    p.add_argument("--max-ws-clients", type=int, default=64, metavar="N",
                   help="WebSocket clients at once (default: 64)")
    p.add_argument("-j", "--max-concurrent-downloads", type=_at_least_one, default=5, metavar="N",
                   help="downloads fetching data at once; more wait in the queue (default: 5, "
                        "as aria2; a seeding download holds no slot)")
    p.add_argument("--save-session", default=None, metavar="FILE",
                   help="write the live downloads here (aria2 format) on saveSession and on exit")
    p.add_argument("--save-session-interval", type=float, default=0, metavar="S",
                   help="also write the session file every S seconds (default: 0, never)")
    p.add_argument("--input-file", default=None, metavar="FILE",
                   help="add the downloads of this session file at start, with their gids")
    add_hook_options(p)


def _at_least_one(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, not {text!r}") from None
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n}: expected at least 1")
    return n


def daemon_args(*argv: str) -> argparse.Namespace:
    """``bt daemon ARGV`` parsed, for running :func:`serve_daemon` in a
    program of one's own (tests, the benchmark)."""
    from .._cli import _parser
    return _parser().parse_args(["daemon", *argv])


#: Events after which a slot of the queue may be free (bt.events' kinds).
_SLOT_FREED = frozenset({"bt-complete", "complete", "error", "stop", "pause"})

#: The progress bars while a daemon runs on a terminal (bt.progress.Bars):
#: lines are then printed above them.
_bars: Any = None


def _say(line: str) -> None:
    if _bars is not None:
        _bars.say(line)
        return
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


async def _show_bars(api: Any, bars: Any) -> None:
    """On a terminal: a bar per download of the session, redrawn every
    second (gone when the download is removed)."""
    import trio

    from .._cli_run import status_line
    while True:
        live = {}
        for t in list(api.session.torrents.values()):
            gid = api.event_gid(t) or t.gid
            meta = getattr(t, "meta", None)
            live[gid] = (meta.name if meta is not None else gid, t.status())
        for gid in bars.keys() - set(live):
            bars.remove(gid)
        for gid, (name, st) in live.items():
            bars.update(gid, name, st.bytes_have, st.bytes_total, status_line(st))
        await trio.sleep(1.0)


def _event_line(gid: str, ev: Any) -> str:
    st = ev.status
    return (f"[{gid}] {ev.name}: {ev.kind} ({st.progress * 100:.1f}%, "
            f"{st.bytes_have}/{st.bytes_total} bytes, {st.peers} peers)")


@dataclass(frozen=True)
class Running:
    """What :func:`serve_daemon` reports once it listens (for tests and the
    benchmark): the RPC's bound URLs (``http://127.0.0.1:6800``), the
    server and the method layer (whose ``session`` is the session)."""
    urls: list[str]
    server: Any
    api: Any

    @property
    def url(self) -> str:
        return self.urls[0]


async def serve_daemon(args: argparse.Namespace, *, task_status: Any = None) -> int:
    """Run the daemon until a signal or a shutdown call.  ``task_status``
    (trio's) gets a :class:`Running` once the RPC listens.  On a
    terminal, a rich progress bar per download (:mod:`bt.progress`)."""
    global _bars
    os.makedirs(args.dir, exist_ok=True)
    if sys.stderr.isatty():
        from ..progress import Bars
        _bars = Bars()
    try:
        return await _serve(args, task_status)
    finally:
        if _bars is not None:
            _bars.stop()
            _bars = None


async def _serve(args: argparse.Namespace, task_status: Any) -> int:
    import trio

    from .._cli_run import install_hooks
    from ..session import open_session
    from .aria2 import NOTIFICATIONS, Aria2Api
    from .jsonrpc import Dispatcher, RpcError
    from .page import PAGE
    from .server import RpcServer
    from .sessionfile import parse_session, render_session, write_session

    stop = trio.Event()
    force = {"now": False}

    def shutdown(forced: bool) -> None:
        force["now"] = force["now"] or forced
        stop.set()

    async with open_session(download_dir=os.path.abspath(args.dir), port=args.port,
                            host=args.bind, utp=not args.no_utp, tcp=not args.no_tcp,
                            upload_limit=args.max_upload_rate or None,
                            download_limit=args.max_download_rate or None,
                            dht=not args.no_dht and not args.no_utp,
                            dht_bootstrap=args.dht_bootstrap,
                            encryption=args.encryption) as session:
        async def save() -> None:
            text, files = render_session(api, args.save_session)
            await trio.to_thread.run_sync(write_session, args.save_session, text, files)

        api = Aria2Api(session, save_session=save if args.save_session else None,
                       shutdown=shutdown)
        api.options["max-concurrent-downloads"] = str(args.max_concurrent_downloads)
        if args.max_download_rate:
            api.options["max-overall-download-limit"] = str(args.max_download_rate)
        if args.max_upload_rate:
            api.options["max-overall-upload-limit"] = str(args.max_upload_rate)
        dispatcher = Dispatcher(api.methods(), secret=args.rpc_secret, notifications=NOTIFICATIONS)
        server = RpcServer(dispatcher, page=PAGE, max_body=args.rpc_max_request_size,
                           max_ws_clients=args.max_ws_clients,
                           allow_origin_all=args.rpc_allow_origin_all)
        api.notify = server.broadcast

        def on_event(ev: Any) -> None:
            gid = api.event_gid(ev.torrent) or ev.gid
            server.broadcast(ev.method, gid)
            _say(_event_line(gid, ev))
            if ev.kind in _SLOT_FREED:          # a waiting download may start
                session.spawn(api.schedule)
        session.add_listener(on_event)
        install_hooks(args, session)

        if args.input_file:
            await _load(api, args.input_file, parse_session, RpcError)
        async with trio.open_nursery() as nursery:
            host, port = args.rpc_listen
            bound = await nursery.start(server.serve, host, port)
            _say(f"bt daemon: peers on port {session.port}; JSON-RPC on "
                 f"{bound[0]}/jsonrpc, status page on {bound[0]}/")
            if task_status is not None:
                task_status.started(Running(bound, server, api))
            if args.save_session and args.save_session_interval > 0:
                nursery.start_soon(_autosave, save, args.save_session_interval)
            if _bars is not None:
                nursery.start_soon(_show_bars, api, _bars)
            with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async def on_signal() -> None:
                    async for _ in signals:
                        shutdown(False)
                nursery.start_soon(on_signal)
                await stop.wait()
            if not force["now"]:
                await trio.sleep(0.2)            # the shutdown call's answer goes out
            if args.save_session:
                try:
                    await save()
                except OSError as exc:
                    _say(f"bt daemon: cannot write {args.save_session}: {exc}")
            nursery.cancel_scope.cancel()
    _say("bt daemon: stopped")
    return 0


async def _autosave(save: Any, interval: float) -> None:
    import trio
    while True:
        await trio.sleep(interval)
        try:
            await save()
        except OSError as exc:
            _say(f"bt daemon: cannot write the session file: {exc}")


async def _load(api: Any, path: str, parse_session: Any, rpc_error: Any) -> None:
    """Add every download of an input file; one that fails is reported
    and skipped (the others still start)."""
    import trio
    try:
        with open(path, encoding="utf-8") as f:
            entries = parse_session(f.read())
    except FileNotFoundError:
        _say(f"bt daemon: {path}: no session file yet; starting empty")
        return
    except (OSError, ValueError, UnicodeDecodeError) as exc:
        _say(f"bt daemon: {path}: {exc}")
        return
    for e in entries:
        opts = dict(e.options)
        gid = opts.pop("gid", None)
        try:
            if e.uri.startswith("magnet:"):
                source: bytes | str = e.uri
            else:
                source = await trio.to_thread.run_sync(_read, e.uri)
            d = await api.add(source, opts, gid=gid)
            _say(f"[{d.gid}] restored from {path}")
        except (OSError, rpc_error) as exc:
            _say(f"bt daemon: {path}: {e.uri}: {getattr(exc, 'message', exc)}")


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(64 * 1024 * 1024)


def run(args: argparse.Namespace) -> int:
    """``bt daemon``; returns the exit status."""
    import trio

    from .._cli_run import _say as say
    from ..session import SessionError
    logging.basicConfig(level=logging.WARNING, format="bt daemon: %(name)s: %(message)s")
    logging.getLogger("bt.hooks").setLevel(logging.INFO)
    try:
        return trio.run(serve_daemon, args)
    except KeyboardInterrupt:
        return 0
    except (SessionError, OSError) as exc:
        say(f"bt daemon: {exc}")
        return 1
