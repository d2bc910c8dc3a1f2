"""``bt download`` and ``bt seed``: one torrent, one session, a progress
line on stderr.

    bt download X.torrent -d DIR [--peer HOST:PORT]... [--tracker URL]... [--no-trackers]
                [--port N] [--seed] [--no-utp | --no-tcp]
                [--max-upload-rate RATE] [--max-download-rate RATE]
                [--encryption disabled|enabled|preferred|required]
                [--on-download-start CMD] [--on-download-pause CMD] [--on-download-stop CMD]
                [--on-download-complete CMD] [--on-download-error CMD]
                [--on-bt-download-complete CMD] [--hook-timeout S]
    bt seed X.torrent -d DIR [same options as download, but --seed]

Each download event (:mod:`bt.events`: start, pause, bt-complete,
complete, stop, error) is a line ``[GID] KIND: NAME``, and runs the hook
command given for it (:mod:`bt.hooks`: aria2's options and arguments --
gid, number of files, first file's path -- run directly, not through a
shell; terminated after ``--hook-timeout`` seconds).  ``download``
without ``--seed`` ends the download once its data is complete, so its
``complete`` event (and hook) comes as it exits, as aria2c's with
``--seed-time=0``.

The torrent's trackers (BEP 12 tiers; http, https and udp) are announced
to unless ``--no-trackers``; ``--tracker`` adds one more tier each.  A
tracker's state changes (working, failing with the reason, a warning)
are printed as lines of their own.

RATE is bytes per second, with an optional K, M or G suffix (powers of
1024; ``500K``, ``1.5M``, an optional trailing ``B``, ``/s`` or ``B/s``);
0 means unlimited.

Progress goes to stderr: a line redrawn in place on a terminal, plain
lines every ``--status-interval`` seconds otherwise (logs, pipes, tests).
``download`` exits 0 once every piece is verified; with ``--seed`` (and
always for ``seed``) it keeps serving until interrupted (SIGINT), and an
interruption after the data is complete is a success.  Failures: one line
``bt download: ...`` and exit 1.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import sys
from typing import Any

from _utpkit.addr import parse_hostport

__all__ = ["add_parsers", "run"]


def _peer(text: str) -> tuple[str, int]:
    try:
        host, port = parse_hostport(text, bare_ipv6=False)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not port:
        raise argparse.ArgumentTypeError(f"port 0 in {text!r}")
    return host, port


_RATE = re.compile(r"(\d+(?:\.\d*)?|\.\d+)\s*([kmg]?)(?:i?b)?(?:/s)?", re.IGNORECASE)
_RATE_UNITS = {"": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3}


def parse_rate(text: str) -> int:
    """A rate in bytes/s from ``500K``, ``1.5M``, ``2MiB/s``, ``65536`` (K,
    M, G are powers of 1024); 0 means unlimited."""
    m = _RATE.fullmatch(text.strip())
    if m is None:
        raise argparse.ArgumentTypeError(
            f"expected a rate in bytes/s such as 65536, 500K or 1.5M (0: unlimited), not {text!r}")
    return int(float(m.group(1)) * _RATE_UNITS[m.group(2).lower()])


def add_rate_and_transport_options(p: argparse.ArgumentParser) -> None:
    """--max-upload-rate, --max-download-rate, --no-utp | --no-tcp,
    --encryption: shared by download, seed and daemon."""
    p.add_argument("--max-upload-rate", type=parse_rate, default=0, metavar="RATE",
                   help="upload limit in bytes/s, K/M/G suffixes allowed (default: none)")
    p.add_argument("--max-download-rate", type=parse_rate, default=0, metavar="RATE",
                   help="download limit in bytes/s, K/M/G suffixes allowed (default: none)")
    p.add_argument("--encryption", default="preferred",
                   choices=("disabled", "enabled", "preferred", "required"), metavar="POLICY",
                   help="message stream encryption (MSE): disabled, enabled (accept it, dial "
                        "plain first), preferred (dial MSE first, fall back to plain; the "
                        "default, as libtorrent's) or required (RC4 only)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--no-utp", action="store_true", help="TCP only")
    g.add_argument("--no-tcp", action="store_true", help="uTP only")


def add_parsers(sub: Any) -> None:
    for name, what in (("download", "download a torrent (and optionally keep seeding)"),
                       ("seed", "check the data of a torrent and serve it")):
        p = sub.add_parser(name, help=what)
        p.add_argument("torrent", help="the .torrent file")
        p.add_argument("-d", "--dir", required=True, metavar="DIR",
                       help="the download directory (the torrent's files go under it)")
        p.add_argument("--peer", action="append", default=[], type=_peer, metavar="HOST:PORT",
                       help="a peer to connect to (repeatable)")
        p.add_argument("--tracker", action="append", default=[], metavar="URL",
                       help="announce to this tracker too, after the torrent's own (repeatable)")
        p.add_argument("--no-trackers", action="store_true",
                       help="announce to no tracker (peers from --peer only)")
        p.add_argument("--port", type=int, default=0, metavar="N",
                       help="the UDP (uTP) and TCP port to listen on (default: any free one)")
        p.add_argument("--bind", default=None, metavar="ADDR",
                       help="the local address to listen on (default: all)")
        if name == "download":
            p.add_argument("--seed", action="store_true",
                           help="keep seeding after the download until interrupted")
        add_rate_and_transport_options(p)
        p.add_argument("--status-interval", type=float, default=5.0, metavar="S",
                       help="seconds between progress lines when stderr is not a terminal")
        add_hook_options(p)


def add_hook_options(p: argparse.ArgumentParser) -> None:
    """aria2's --on-download-* hook options and --hook-timeout (download,
    seed and daemon); :func:`install_hooks` puts them to work."""
    for _, option, when in _HOOKS:
        p.add_argument(f"--{option}", default=None, metavar="COMMAND",
                       help=f"run COMMAND GID NUM_FILES FIRST_FILE_PATH {when} "
                            "(aria2's hook; run directly, not through a shell)")
    p.add_argument("--hook-timeout", type=_positive, default=60.0, metavar="S",
                   help="seconds a hook command may run before it is terminated (default 60)")


def install_hooks(args: argparse.Namespace, session: Any) -> None:
    """The hook commands given on the command line, on ``session``."""
    from .hooks import Hooks
    commands = {kind: getattr(args, option.replace("-", "_")) for kind, option, _ in _HOOKS}
    if any(commands.values()):
        Hooks(commands, timeout=args.hook_timeout).install(session)


def _positive(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value > 0 or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, not {text!r}")
    return value


#: aria2's hook options: (event kind as bt.events.EventKind spells it,
#: option, help).  Spelled out here so that ``bt info`` and ``bt create``
#: do not import trio (bt.events does).
_HOOKS = (
    ("start", "on-download-start", "when a download starts (added, resumed)"),
    ("pause", "on-download-pause", "when a download is paused"),
    ("stop", "on-download-stop",
     "when a download stops (and for complete/error when their own hook is not set)"),
    ("complete", "on-download-complete", "when a download ends with all its data"),
    ("error", "on-download-error", "when a download stops with an error"),
    ("bt-complete", "on-bt-download-complete",
     "when all the data is verified (seeding goes on)"),
)


def _human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError


def _eta(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "--"
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def status_line(st: Any) -> str:
    """One line of progress: done/total, rates, peers, ETA."""
    return (f"{st.state} {st.progress * 100:5.1f}% {_human(st.bytes_have)}/{_human(st.bytes_total)}"
            f" down {_human(st.download_rate)}/s up {_human(st.upload_rate)}/s"
            f" peers {st.peers} ({st.peers_utp} uTP) eta {_eta(st.eta)}")


class _Progress:
    """A rich progress bar on a terminal (:class:`bt.progress.Bars`),
    plain status lines every ``interval`` seconds otherwise."""

    def __init__(self, interval: float) -> None:
        self.tty = sys.stderr.isatty()
        self.interval = interval
        self.last = -math.inf
        self.name = ""
        self.bars: Any = None
        if self.tty:
            from .progress import Bars
            self.bars = Bars()

    def show(self, st: Any, now: float, *, force: bool = False) -> None:
        line = status_line(st)
        if self.bars is not None:
            self.bars.update("torrent", self.name, st.bytes_have, st.bytes_total, line)
        elif force or now - self.last >= self.interval:
            self.last = now
            sys.stderr.write(line + "\n")
            sys.stderr.flush()

    def end(self) -> None:
        if self.bars is not None:
            self.bars.stop()


def _say(message: str) -> None:
    sys.stderr.write(message + "\n")
    sys.stderr.flush()


def _say_over(progress: _Progress, message: str) -> None:
    """A line of its own, above the progress bar on a terminal."""
    if progress.bars is not None:
        progress.bars.say(message)
    else:
        _say(message)


def _event_line(progress: _Progress, event: Any) -> None:
    """``[GID] KIND: NAME`` (and the error) for each download event."""
    line = f"[{event.gid}] {event.kind}: {event.name}"
    if event.status.error:
        line += f": {event.status.error}"
    _say_over(progress, line)


class _LogLines(logging.Handler):
    """The bt loggers (hook results, listener failures) as lines on stderr."""

    def __init__(self, prog: str, progress: _Progress | None = None) -> None:
        super().__init__(logging.INFO)
        self.prog = prog
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        line = f"{self.prog}: {record.getMessage()}"
        if self.progress is not None:
            _say_over(self.progress, line)
        else:
            _say(line)


async def _main(args: argparse.Namespace, done: dict[str, bool]) -> int:
    """Run the transfer; SIGINT and SIGTERM end it cleanly (connections
    closed, resume file written)."""
    import trio

    from _utpkit.excgroup import unwrapped

    keep_seeding = args.command == "seed" or args.seed
    progress = _Progress(args.status_interval)
    for handler in logging.getLogger("bt").handlers:
        if isinstance(handler, _LogLines):
            handler.progress = progress
    status = 1
    try:
        with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
            async with unwrapped(), trio.open_nursery() as nursery:
                async def stop_on_signal() -> None:
                    async for _ in signals:
                        done["interrupted"] = True
                        nursery.cancel_scope.cancel()
                nursery.start_soon(stop_on_signal)
                status = await _transfer(args, done, progress, keep_seeding)
                nursery.cancel_scope.cancel()
    finally:
        progress.end()          # the bars stop before any last line
    if done["interrupted"]:
        _say(f"bt {args.command}: interrupted")
        return 0 if keep_seeding and done["complete"] else 130
    return status


async def _transfer(args: argparse.Namespace, done: dict[str, bool], progress: _Progress,
                    keep_seeding: bool) -> int:
    import trio

    from .session import open_session
    from .torrent import TorrentError

    async with open_session(download_dir=args.dir, port=args.port, host=args.bind,
                            utp=not args.no_utp, tcp=not args.no_tcp,
                            upload_limit=args.max_upload_rate or None,
                            download_limit=args.max_download_rate or None,
                            encryption=args.encryption) as session:
        # the first line says where we listen: events of the add wait for it
        held: list[Any] | None = []

        def on_event(event: Any) -> None:
            if held is not None:
                held.append(event)
            else:
                _event_line(progress, event)
        session.add_listener(on_event)
        install_hooks(args, session)
        torrent = await session.add_torrent(args.torrent, trackers=args.tracker,
                                            use_trackers=not args.no_trackers)
        st = torrent.status()
        progress.name = torrent.meta.name
        _say(f"{torrent.meta.name}: {st.pieces_have}/{st.pieces_total} pieces "
             f"({_human(st.bytes_have)} of {_human(st.bytes_total)}) already here; "
             f"listening on port {session.port}")
        for event in held or ():
            _event_line(progress, event)
        held = None
        for addr in args.peer:
            torrent.add_peer(addr)
        tick = 1.0 if progress.tty else min(1.0, args.status_interval)
        said: dict[str, tuple[Any, ...]] = {}
        while True:
            now = trio.current_time()
            st = torrent.status()
            _tracker_changes(st, said, progress)
            if st.error is not None:
                progress.end()
                raise TorrentError(st.error)
            if torrent.finished and not done["complete"]:
                done["complete"] = True
                progress.show(st, now, force=True)
                progress.end()
                _say(f"{torrent.meta.name}: complete, every piece verified"
                     + ("; seeding until interrupted" if keep_seeding else ""))
                if not keep_seeding:
                    return 0
            progress.show(st, now)
            with trio.move_on_after(tick):
                if torrent.finished:
                    await trio.sleep_forever()
                await torrent.wait_finished()


def _tracker_changes(st: Any, said: dict[str, tuple[Any, ...]], progress: _Progress) -> None:
    """A line for each tracker whose state, error or warning changed."""
    for t in st.trackers:
        key = (t.state, t.error, t.warning)
        if t.state == "announcing" or said.get(t.url) == key:
            continue
        said[t.url] = key
        if t.state == "working":
            line = f"tracker {t.url}: working, {t.last_peers} peers"
        elif t.state == "not contacted":
            continue
        else:
            line = f"tracker {t.url}: {t.state}: {t.error}"
        if t.warning:
            line += f" (warning: {t.warning})"
        _say_over(progress, line)


def run(args: argparse.Namespace) -> int:
    """Run ``bt download`` / ``bt seed``; returns the exit status."""
    import trio

    from _utpkit.errors import ProtocolError

    from .session import SessionError
    from .storage import StorageError
    from .torrent import TorrentError

    prog = f"bt {args.command}"
    if not os.path.isfile(args.torrent):
        _say(f"{prog}: {args.torrent}: no such file")
        return 1
    done = {"complete": False, "interrupted": False}
    logger = logging.getLogger("bt")
    handler = _LogLines(prog)
    logger.addHandler(handler)
    level = logger.level
    if level == logging.NOTSET or level > logging.INFO:
        logger.setLevel(logging.INFO)
    try:
        return trio.run(_main, args, done)
    except KeyboardInterrupt:
        _say(f"{prog}: interrupted")
        return 0 if (args.command == "seed" or args.seed) and done["complete"] else 130
    except ProtocolError as exc:           # MetainfoError names the field
        _say(f"{prog}: {args.torrent}: {exc}")
    except (StorageError, TorrentError, SessionError) as exc:
        _say(f"{prog}: {exc}")
    except OSError as exc:
        _say(f"{prog}: {exc.filename or ''}: {exc.strerror or exc}")
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    return 1
