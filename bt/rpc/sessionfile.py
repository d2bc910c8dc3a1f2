"""The daemon's session file, in aria2's ``--input-file`` format: one
download per entry, a URI or a path on a line of its own, then its
options indented, one ``key=value`` a line::

    /var/lib/bt/session.torrents/0123...cdef.torrent
     gid=2089b05ecca3d829
     dir=/srv/downloads
     pause=true
    magnet:?xt=urn:btih:...
     gid=d2a4c6e8f0b1a3c5

A torrent added as base64 (``aria2.addTorrent``), or a magnet whose
metadata has arrived, is written as ``<infohash>.torrent`` into the
directory ``SESSION_FILE.torrents`` next to the session file, and its
entry names that path (aria2 with ``--rpc-save-upload-metadata`` does the
same, into its ``--dir``): the session file and that directory together
restore every download, each with its gid, and aria2c itself can read the
file.  A magnet still fetching its metadata is written as its URI with
the gid of its metadata step.

Only live downloads are written (active, waiting, paused), as aria2
does without ``--force-save``.  The file is replaced atomically (written
beside it, then renamed).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .aria2 import Aria2Api, Download

__all__ = ["Entry", "parse_session", "render_session", "write_session", "torrent_bytes",
           "torrents_dir"]

_SAVED_OPTIONS = ("dir", "pause", "max-download-limit", "max-upload-limit", "seed-time")


@dataclass
class Entry:
    """One download of a session file: its URI or path and options."""
    uri: str
    options: dict[str, str] = field(default_factory=dict)


def parse_session(text: str) -> list[Entry]:
    """Entries of an aria2 input file (``#`` comments and blank lines
    skipped; tab-separated URIs on one line: the first is used).
    ValueError naming the line for an option before any URI."""
    out: list[Entry] = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        if line[0] in " \t":
            if not out:
                raise ValueError(f"line {n}: an option before any URI")
            key, sep, value = line.strip().partition("=")
            if not sep:
                raise ValueError(f"line {n}: expected key=value, not {line.strip()!r}")
            out[-1].options[key.strip()] = value.strip()
        else:
            out.append(Entry(line.strip().split("\t")[0]))
    return out


def torrents_dir(session_path: str) -> str:
    return session_path + ".torrents"


def torrent_bytes(d: "Download") -> bytes:
    """The .torrent of a download: what was added, or (for a magnet whose
    metadata arrived) a torrent made of its info dictionary."""
    if isinstance(d.source, bytes):
        return d.source
    return b"d4:info" + d.torrent.meta.info_bytes + b"e"


def render_session(api: "Aria2Api", session_path: str) -> tuple[str, dict[str, bytes]]:
    """The session file's text and the .torrent files it names (path ->
    bytes)."""
    lines = ["# utpkit bt daemon session (aria2 input-file format)"]
    files: dict[str, bytes] = {}
    tdir = os.path.abspath(torrents_dir(session_path))
    api.sync()
    for d in api.downloads.values():
        if d.final is not None or d.status() not in ("active", "waiting", "paused"):
            continue
        if d.metadata_step:
            lines.append(str(d.source))
        else:
            path = os.path.join(tdir, d.torrent.info_hash.hex() + ".torrent")
            files[path] = torrent_bytes(d)
            lines.append(path)
        opts = {k: v for k, v in d.options.items() if k in _SAVED_OPTIONS}
        opts["dir"] = d.dir
        opts["gid"] = d.gid
        if d.status() == "paused":
            opts["pause"] = "true"
        else:
            opts.pop("pause", None)
        lines.extend(f" {k}={v}" for k, v in sorted(opts.items()))
    return "\n".join(lines) + "\n", files


def _atomic_write(path: str, data: bytes) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_session(session_path: str, text: str, files: dict[str, bytes]) -> None:
    """Write what :func:`render_session` made (blocking: run it in a
    thread; render on the event loop).  OSError when a file cannot be
    written."""
    if files:
        os.makedirs(torrents_dir(session_path), exist_ok=True)
    for path, data in files.items():
        if not os.path.exists(path):
            _atomic_write(path, data)
    _atomic_write(session_path, text.encode())
