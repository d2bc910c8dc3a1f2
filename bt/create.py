"""Creating .torrent files (BEP 3, BEP 12 tiers, BEP 47 pad files).

The work is blocking -- reading and SHA-1 hashing every byte -- so
:func:`create_torrent` is a plain function meant to run off the event loop
(``await trio.to_thread.run_sync(create_torrent, path, ...)``, which
:func:`create_torrent_async` does); the CLI simply calls it.

What we write is a v1 torrent, read back by :func:`bt.metainfo.parse_metainfo_untrusted`
before it is returned, so a bug here cannot produce a torrent we would refuse.
"""

from __future__ import annotations

import functools
import hashlib
import os
import stat
import time
from dataclasses import dataclass
from typing import Any, Callable, Sequence

from _utpkit.bencode import encode
from _utpkit.errors import LocalProtocolError

from .metainfo import check_path_components, parse_metainfo_untrusted

__all__ = ["CreateError", "SourceFile", "piece_size_for", "scan_source", "hash_pieces",
           "create_torrent", "create_torrent_async", "write_torrent", "BLOCK_SIZE"]

#: The request size every client uses (BEP 3 practice); pieces are multiples of it.
BLOCK_SIZE = 16 * 1024
_MIN_AUTO = BLOCK_SIZE
_MAX_AUTO = 16 * 1024 * 1024
_READ_CHUNK = 1024 * 1024


class CreateError(LocalProtocolError):
    """The torrent cannot be made: no data, an unreadable file, a bad
    piece size.  One line naming the path or the parameter."""


def piece_size_for(total_size: int) -> int:
    """The piece size libtorrent would choose for ``total_size`` bytes.

    libtorrent aims for a piece list (20 bytes a hash) of about twice the
    square root of the content size, i.e. ``total <= (2 * piece / 20) ** 2``:
    the smallest power of two from 16 KiB to 8 MiB that satisfies it, else
    16 MiB.  So 1 GiB gets 512 KiB pieces and 4 GiB gets 1 MiB ones."""
    piece = _MIN_AUTO
    while piece < _MAX_AUTO:
        # ceil(piece**2 / 100) is (2 * piece / 20) ** 2 rounded up, exactly
        # libtorrent's table of thresholds.
        if -(-piece * piece // 100) >= total_size:
            return piece
        piece *= 2
    return _MAX_AUTO


def check_piece_size(n: int) -> int:
    """A piece size we write: a power of two of at least 16 KiB (what
    libtorrent accepts for any torrent and BEP 52 requires), at most 128 MiB."""
    if n < BLOCK_SIZE or n & (n - 1) or n > 128 * 1024 * 1024:
        raise CreateError(f"piece size: {n} is not a power of two from 16 KiB to 128 MiB")
    return n


@dataclass(frozen=True, slots=True)
class SourceFile:
    """One file to put in a torrent: its path inside the torrent (without
    the torrent's name), its size, and where to read it (``source`` is None
    for a pad file, whose bytes are zeros)."""

    path: tuple[str, ...]
    length: int
    source: str | None
    executable: bool = False

    @property
    def pad(self) -> bool:
        return self.source is None


def scan_source(path: str | os.PathLike[str]) -> tuple[str, list[SourceFile], bool]:
    """What a torrent of ``path`` holds: ``(name, files, multi_file)``.

    A regular file gives a single-file torrent; a directory gives a
    multi-file one of every regular file below it, sorted by path so the
    same tree always makes the same torrent.  Symlinks are followed (like
    libtorrent's default); anything that is neither file nor directory
    (sockets, FIFOs) is skipped."""
    path = os.fspath(path)
    name = os.path.basename(os.path.normpath(os.path.abspath(path)))
    try:
        st = os.stat(path)
    except OSError as exc:
        raise CreateError(f"{path}: {exc.strerror}") from None
    if stat.S_ISREG(st.st_mode):
        check_path_components((name,), path)
        return name, [SourceFile((), st.st_size, path, bool(st.st_mode & stat.S_IXUSR))], False
    if not stat.S_ISDIR(st.st_mode):
        raise CreateError(f"{path}: neither a file nor a directory")
    files: list[SourceFile] = []

    def walk(d: str, rel: tuple[str, ...], depth: int) -> None:
        if depth > 64:
            raise CreateError(f"{d}: directories nested more than 64 deep (a symlink loop?)")
        try:
            entries = sorted(os.scandir(d), key=lambda e: e.name)
        except OSError as exc:
            raise CreateError(f"{d}: {exc.strerror}") from None
        for e in entries:
            try:
                s = os.stat(e.path)
            except OSError as exc:
                raise CreateError(f"{e.path}: {exc.strerror}") from None
            if stat.S_ISDIR(s.st_mode):
                walk(e.path, rel + (e.name,), depth + 1)
            elif stat.S_ISREG(s.st_mode):
                files.append(SourceFile(rel + (e.name,), s.st_size, e.path, bool(s.st_mode & stat.S_IXUSR)))

    walk(path, (), 0)
    if not files:
        raise CreateError(f"{path}: no files in the directory")
    for f in files:
        check_path_components((name, *f.path), f.source or path)
    return name, files, True


def _with_pad_files(files: list[SourceFile], piece_length: int) -> list[SourceFile]:
    # BEP 47: a pad file after every file that does not end on a piece
    # boundary, so each file starts a piece (none after the last file, and
    # none after an empty file, which takes no room).
    out: list[SourceFile] = []
    offset = 0
    for k, f in enumerate(files):
        out.append(f)
        offset += f.length
        gap = -offset % piece_length
        if gap and k + 1 < len(files):
            out.append(SourceFile((".pad", str(gap)), gap, None))
            offset += gap
    return out


def hash_pieces(files: Sequence[SourceFile], piece_length: int,
                progress: Callable[[int, int], None] | None = None) -> bytes:
    """SHA-1 of every piece of the concatenated ``files`` (pad files are
    zeros).  Blocking: run it in a thread.  ``progress(done, total)`` is
    called after each piece, in this thread.  A file whose size changed
    since it was scanned is an error, not a silently wrong torrent."""
    total = sum(f.length for f in files)
    num_pieces = -(-total // piece_length)
    out = bytearray()
    h = hashlib.sha1()
    in_piece = 0

    def feed(data: bytes | memoryview) -> None:
        nonlocal h, in_piece
        view = memoryview(data)
        while view:
            n = min(len(view), piece_length - in_piece)
            h.update(view[:n])
            in_piece += n
            view = view[n:]
            if in_piece == piece_length:
                out.extend(h.digest())
                h = hashlib.sha1()
                in_piece = 0
                if progress is not None:
                    progress(len(out) // 20, num_pieces)

    for f in files:
        if f.source is None:
            feed(bytes(f.length))
            continue
        left = f.length
        try:
            with open(f.source, "rb") as fh:
                while left:
                    chunk = fh.read(min(_READ_CHUNK, left))
                    if not chunk:
                        break
                    left -= len(chunk)
                    feed(chunk)
                extra = fh.read(1)
        except OSError as exc:
            raise CreateError(f"{f.source}: {exc.strerror}") from None
        if left or extra:
            raise CreateError(f"{f.source}: the file changed size while it was being hashed")
    if in_piece:
        out.extend(h.digest())
        if progress is not None:
            progress(len(out) // 20, num_pieces)
    return bytes(out)


def _tiers(trackers: Sequence[str | Sequence[str]]) -> list[list[str]]:
    tiers: list[list[str]] = []
    seen: set[str] = set()
    for t in trackers:
        urls = [t] if isinstance(t, str) else list(t)
        tier = []
        for u in urls:
            if not u or u in seen:      # libtorrent also drops repeats
                continue
            seen.add(u)
            tier.append(u)
        if tier:
            tiers.append(tier)
    return tiers


def create_torrent(path: str | os.PathLike[str], *, trackers: Sequence[str | Sequence[str]] = (),
                   piece_length: int | None = None, private: bool = False, pad_files: bool = False,
                   comment: str | None = None, created_by: str | None = "utpkit",
                   creation_date: int | None = None,
                   progress: Callable[[int, int], None] | None = None) -> bytes:
    """Make a v1 torrent of the file or directory at ``path``; return its bytes.

    ``trackers``: each item is a tier (BEP 12); a plain string is a tier of
    its own.  ``announce`` is the first URL; ``announce-list`` is written
    when there is more than one, as libtorrent does.  ``piece_length``
    defaults to :func:`piece_size_for` of the content size.  ``pad_files``
    adds BEP 47 pad files so that every file starts on a piece boundary
    (off by default, as in libtorrent's v1 torrents).  ``creation_date``
    defaults to now; pass 0 to leave it out (a reproducible torrent).

    Blocking (reads and hashes everything): run it in a thread."""
    name, files, multi = scan_source(path)
    total = sum(f.length for f in files)
    if total == 0:
        raise CreateError(f"{os.fspath(path)}: no data to share (every file is empty)")
    piece_length = check_piece_size(piece_length) if piece_length else piece_size_for(total)
    if multi and pad_files:
        files = _with_pad_files(files, piece_length)
    pieces = hash_pieces(files, piece_length, progress)

    info: dict[bytes, object] = {b"name": name.encode(), b"piece length": piece_length, b"pieces": pieces}
    if private:
        info[b"private"] = 1
    if multi:
        entries = []
        for f in files:
            e: dict[bytes, object] = {b"length": f.length, b"path": [c.encode() for c in f.path]}
            attr = ("p" if f.pad else "") + ("x" if f.executable else "")
            if attr:
                e[b"attr"] = attr.encode()
            entries.append(e)
        info[b"files"] = entries
    else:
        info[b"length"] = files[0].length
        if files[0].executable:
            info[b"attr"] = b"x"
    top: dict[bytes, object] = {b"info": info}
    tiers = _tiers(trackers)
    if tiers:
        top[b"announce"] = tiers[0][0].encode()
        if sum(len(t) for t in tiers) > 1:
            top[b"announce-list"] = [[u.encode() for u in t] for t in tiers]
    if comment:
        top[b"comment"] = comment.encode()
    if created_by:
        top[b"created by"] = created_by.encode()
    date = int(time.time()) if creation_date is None else creation_date
    if date:
        top[b"creation date"] = date
    data = encode(top)
    parse_metainfo_untrusted(data)       # what we write, we must be able to read
    return data


async def create_torrent_async(path: str | os.PathLike[str], **kwargs: Any) -> bytes:
    """:func:`create_torrent` in a worker thread (trio), so hashing a large
    tree does not stall the event loop.

    Cancellation: a thread cannot be interrupted, so a cancelled call
    still waits for the hashing to end; pass a ``progress`` callback that
    raises to stop it early."""
    import trio
    return await trio.to_thread.run_sync(functools.partial(create_torrent, path, **kwargs))


def write_torrent(data: bytes, out: str | os.PathLike[str]) -> None:
    """Write torrent bytes to ``out`` atomically (a temporary file in the
    same directory, fsync, rename): a crash never leaves half a torrent."""
    out = os.fspath(out)
    tmp = f"{out}.{os.getpid()}.tmp"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise CreateError(f"{out}: {exc.strerror}") from None
