"""``bt`` / ``python -m bt``: make and inspect torrents.

    bt create PATH -o OUT.torrent [--tracker URL]... [--piece-size N] [--private] [--pad-files]
    bt info X.torrent [--json]
    bt download X.torrent -d DIR [--peer HOST:PORT]... [--tracker URL]... [--no-trackers] [--port N] [--seed] [--no-utp | --no-tcp]
    bt seed X.torrent -d DIR [--peer HOST:PORT]... [--port N] [--no-utp | --no-tcp]
    bt daemon [-d DIR] [--rpc-listen HOST:PORT] [--rpc-secret TOKEN] [--save-session FILE] ...

``download`` and ``seed`` live in :mod:`bt._cli_run` (they start trio and
the uTP engine; ``create`` and ``info`` do not); ``daemon`` in
:mod:`bt.rpc.daemon`.

Exit status: 0 success; 1 the torrent could not be made or read (one line
on stderr saying why); 2 usage error.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from _utpkit.errors import ProtocolError

from .create import create_torrent, write_torrent
from ._cli_run import add_parsers as add_run_parsers
from ._cli_run import run as run_transfer
from .metainfo import Metainfo, load_metainfo

__all__ = ["main"]

_UNITS = {"": 1, "k": 1024, "kib": 1024, "m": 1024 ** 2, "mib": 1024 ** 2}


def _size(text: str) -> int:
    t = text.strip().lower()
    num = t.rstrip("kmib")
    unit = t[len(num):]
    if not num.isdigit() or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"expected a size like 262144, 256K or 1M, not {text!r}")
    return int(num) * _UNITS[unit]


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n} {unit}" if unit == "B" else f"{n:.1f} {unit}".replace(".0 ", " ")
        n /= 1024  # type: ignore[assignment]
    raise AssertionError


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bt", description="BitTorrent tools: make and inspect torrents, download and seed them.")
    sub = p.add_subparsers(dest="command", required=True)
    c = sub.add_parser("create", help="make a .torrent of a file or directory")
    c.add_argument("path", help="the file or directory to share")
    c.add_argument("-o", "--output", required=True, metavar="OUT.torrent", help="where to write the torrent")
    c.add_argument("--tracker", action="append", default=[], metavar="URL",
                   help="a tracker URL (repeatable; each is its own tier, tried in order)")
    c.add_argument("--piece-size", type=_size, default=None, metavar="N",
                   help="bytes per piece, a power of two >= 16K (default: chosen from the size, as libtorrent does)")
    c.add_argument("--private", action="store_true", help="set the private flag (BEP 27: trackers only)")
    c.add_argument("--pad-files", action="store_true",
                   help="add BEP 47 pad files so each file starts on a piece boundary")
    c.add_argument("--comment", default=None, help="a comment to store in the torrent")
    i = sub.add_parser("info", help="show what a .torrent holds")
    i.add_argument("torrent")
    i.add_argument("--json", action="store_true", help="print JSON")
    add_run_parsers(sub)
    from .rpc.daemon import add_parser as add_daemon_parser
    add_daemon_parser(sub)
    return p


def _describe(m: Metainfo) -> dict[str, Any]:
    return {
        "name": m.name,
        "info_hash": m.info_hash.hex(),
        "info_hash_v2": m.info_hash_v2.hex() if m.info_hash_v2 else None,
        "total_size": m.total_length,
        "piece_size": m.piece_length,
        "pieces": m.num_pieces,
        "private": m.private,
        "trackers": [list(t) for t in m.trackers],
        "files": [{"path": "/".join(f.path), "size": f.length, "attr": f.attr} for f in m.files],
        "comment": m.comment,
        "created_by": m.created_by,
        "creation_date": m.creation_date,
    }


def _print_info(m: Metainfo) -> None:
    print(f"name:        {m.name}")
    print(f"info hash:   {m.info_hash.hex()}")
    if m.info_hash_v2:
        print(f"v2 hash:     {m.info_hash_v2.hex()} (hybrid v1+v2; used through its v1 side)")
    print(f"size:        {_human(m.total_length)} ({m.total_length} bytes)")
    print(f"pieces:      {m.num_pieces} of {_human(m.piece_length)}")
    print(f"private:     {'yes' if m.private else 'no'}")
    if m.comment:
        print(f"comment:     {m.comment}")
    print("trackers:" + ("" if m.trackers else "    none"))
    for n, tier in enumerate(m.trackers):
        for url in tier:
            print(f"  tier {n}: {url}")
    real = [f for f in m.files if not f.pad]
    pads = len(m.files) - len(real)
    print(f"files:       {len(real)}" + (f" (and {pads} pad files)" if pads else ""))
    for f in real:
        flags = f" [{f.attr}]" if f.attr else ""
        print(f"  {f.length:>14}  {'/'.join(f.path)}{flags}")


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command in ("download", "seed"):
        return run_transfer(args)
    if args.command == "daemon":
        from .rpc.daemon import run as run_daemon
        return run_daemon(args)
    try:
        if args.command == "create":
            def progress(done: int, total: int) -> None:
                if sys.stderr.isatty():
                    print(f"\rhashing: {done}/{total} pieces", end="", file=sys.stderr, flush=True)
            data = create_torrent(args.path, trackers=args.tracker, piece_length=args.piece_size,
                                  private=args.private, pad_files=args.pad_files,
                                  comment=args.comment, progress=progress)
            if sys.stderr.isatty():
                print(file=sys.stderr)
            write_torrent(data, args.output)
            m = load_metainfo(args.output)
            print(f"{args.output}: {m.name}, {_human(m.total_length)} in {m.num_pieces} pieces "
                  f"of {_human(m.piece_length)}, info hash {m.info_hash.hex()}")
        else:
            m = load_metainfo(args.torrent)
            if args.json:
                print(json.dumps(_describe(m), indent=2))
            else:
                _print_info(m)
    except ProtocolError as exc:
        # A CreateError names its path; a MetainfoError names its field.
        where = "" if args.command == "create" else f"{args.torrent}: "
        print(f"bt {args.command}: {where}{exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"bt {args.command}: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"bt {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
