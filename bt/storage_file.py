"""The file backend of :mod:`bt.storage`: a torrent's files under a
download directory, with a resume file.

- **Lazy, sparse files.**  A file is created at the first write into it,
  sized to its length with ``ftruncate`` (no blocks allocated), and written
  with ``os.pwrite``; reads use ``os.pread`` and see zeros where nothing
  was written or the file does not exist.  Pad files (BEP 47) are never
  created: their bytes are zeros by definition.  A BEP 47 symlink entry
  (``attr`` ``l``) is stored as a regular file: a torrent never makes us
  create a symlink.
- **Paths never escape.**  The metainfo parser already refused ``..``,
  absolute paths and the like; here every file's path is also resolved on
  disk (``realpath``) when the torrent is opened and again before a file is
  created, and a symlink already on disk that leads outside the download
  directory is refused with a StorageError naming the file.
- **Resume file.**  ``<resume_dir>/<infohash>.resume``, bencoded: the
  verified pieces and, per file, the size and mtime (ns) it had when they
  were recorded.  Written atomically (temporary file, fsync, rename, fsync
  of the directory) after the data files were fsynced, so it never claims
  a piece whose bytes could still be lost, and a crash mid-write leaves the
  previous one intact.  On :meth:`FileTorrent.check`, pieces of files whose
  size or mtime changed since (a crash after more writes, an edit by
  someone else) are hashed again; the others are trusted; without a usable
  resume file everything is hashed.
- **Errors.**  An OS error (disk full, permission) becomes a StorageError
  naming the file and the cause, and is kept in ``torrent.error`` for the
  session to show; verified pieces are never forgotten because of it.

Blocking: every method does disk I/O; run it in worker threads
(:class:`bt.storage.AsyncTorrentStorage`).  Calls on one torrent may run in
several threads at once (the descriptor table and the resume write are
locked); writes to one piece from two threads at once are the caller's
business, as with any shared buffer.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
import threading
import time
from typing import Any, Callable, Iterator

from _utpkit.bencode import BencodeError, decode_untrusted, encode

from .metainfo import Metainfo
from .storage import BaseTorrent, CheckResult, StorageError

__all__ = ["FileStorage", "FileTorrent", "RESUME_FORMAT"]

RESUME_FORMAT = b"utpkit resume 1"
_MAX_OPEN_FILES = 64
_MAX_RESUME_SIZE = 256 * 1024 * 1024


def _oserror(what: str, path: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {what} {path}: {exc.strerror or exc}", path=path, errno=exc.errno)


class FileStorage:
    """Torrents stored as files under ``download_dir`` (created if missing).

    ``resume_dir``: where resume files go (created if missing); None keeps
    none, so every open needs a full check.  ``resume_interval``: after a
    piece is marked complete, the resume file is rewritten if the last
    write is at least this many seconds old (0: after every piece)."""

    def __init__(self, download_dir: str | os.PathLike[str], *,
                 resume_dir: str | os.PathLike[str] | None = None,
                 resume_interval: float = 5.0) -> None:
        self.download_dir = os.fspath(download_dir)
        self.resume_dir = None if resume_dir is None else os.fspath(resume_dir)
        self.resume_interval = resume_interval

    def open_torrent(self, meta: Metainfo) -> FileTorrent:
        """Open ``meta``'s files (nothing is created yet).  StorageError if
        a path is unsafe on disk or the directory cannot be made."""
        for d in (self.download_dir, self.resume_dir):
            if d is not None:
                try:
                    os.makedirs(d, exist_ok=True)
                except OSError as exc:
                    raise _oserror("create the directory", d, exc) from None
        resume = None
        if self.resume_dir is not None:
            resume = os.path.join(self.resume_dir, meta.info_hash.hex() + ".resume")
        return FileTorrent(meta, self.download_dir, resume, self.resume_interval)


class FileTorrent(BaseTorrent):
    """One torrent's files.  See the module docstring."""

    def __init__(self, meta: Metainfo, download_dir: str, resume_path: str | None,
                 resume_interval: float = 5.0) -> None:
        super().__init__(meta)
        self.root = os.path.realpath(download_dir)
        self.resume_path = resume_path
        self.resume_interval = resume_interval
        self._paths: list[str | None] = []
        self._lock = threading.Lock()           # the descriptor table and _dirty
        self._save_lock = threading.Lock()      # one resume write at a time
        self._fds: dict[int, tuple[int, bool]] = {}     # file index -> (fd, writable)
        self._users: dict[int, int] = {}
        self._dirty: set[int] = set()
        self._resume_dirty = False
        self._last_save = time.monotonic()
        self._empties_made = False
        for f in meta.files:
            if f.pad:
                self._paths.append(None)
            else:
                p = os.path.join(self.root, *f.path)
                self._check_inside(p, f.path)
                self._paths.append(p)

    # --- paths and files -----------------------------------------------------------------

    def _check_inside(self, path: str, parts: tuple[str, ...]) -> None:
        real = os.path.realpath(path)
        if real != self.root and not real.startswith(self.root + os.sep):
            err = StorageError(f"refusing {'/'.join(parts)}: a symlink on disk leads it outside "
                               f"the download directory (to {real})", path=path)
            self.error = err
            raise err

    def file_path(self, file_index: int) -> str | None:
        """Where ``files[file_index]`` lives on disk (None for a pad file)."""
        return self._paths[file_index]

    @contextlib.contextmanager
    def _open(self, fi: int, create: bool) -> Iterator[int | None]:
        """The descriptor of ``files[fi]`` for the duration of the block
        (None: the file is not on disk and ``create`` is false).

        Worker threads share the descriptor table: a lock guards it, and a
        descriptor in use by another thread is never closed to make room
        (the cap on open files is then exceeded for a moment instead)."""
        with self._lock:
            entry = self._fds.get(fi)
            if entry is not None and create and not entry[1] and not self._users.get(fi):
                del self._fds[fi]           # read-only so far; we now need to write
                os.close(entry[0])
                entry = None
            if entry is None:
                entry = self._open_new(fi, create)
                if entry is not None:
                    if len(self._fds) >= _MAX_OPEN_FILES:
                        self._evict()
                    self._fds[fi] = entry
            if entry is not None:
                self._users[fi] = self._users.get(fi, 0) + 1
        if entry is None:
            yield None
            return
        try:
            yield entry[0]
        finally:
            with self._lock:
                self._users[fi] -= 1

    def _open_new(self, fi: int, create: bool) -> tuple[int, bool] | None:
        path = self._paths[fi]
        assert path is not None
        f = self.meta.files[fi]
        try:
            if create:
                os.makedirs(os.path.dirname(path), exist_ok=True)
            # Again, just before opening: a symlink may have appeared since.
            self._check_inside(path, f.path)
            flags = os.O_RDWR | os.O_CLOEXEC | (os.O_CREAT if create else 0)
            try:
                fd = os.open(path, flags, 0o755 if f.executable else 0o644)
            except FileNotFoundError:
                if create:
                    raise
                return None
            except OSError as exc:
                if create or exc.errno not in (errno.EACCES, errno.EPERM, errno.EROFS):
                    raise
                # Seeding data we may not write: read-only will do.
                return os.open(path, os.O_RDONLY | os.O_CLOEXEC), False
            if create and os.fstat(fd).st_size < f.length:
                os.ftruncate(fd, f.length)      # sparse: sets the size, allocates nothing
            return fd, True
        except OSError as exc:
            raise self._fail("create" if create else "open", path, exc) from None

    def _evict(self) -> None:
        # The least recently opened descriptor no thread is using.
        for fi, (fd, _) in self._fds.items():
            if not self._users.get(fi):
                break
        else:
            return
        del self._fds[fi]
        try:
            if fi in self._dirty:
                os.fsync(fd)     # save_resume must not claim data the page cache may lose
                self._dirty.discard(fi)
        finally:
            os.close(fd)

    def _fail(self, what: str, path: str, exc: OSError) -> StorageError:
        err = _oserror(what, path, exc)
        self.error = err
        return err

    def _make_empty_files(self) -> None:
        # Zero-length files hold no piece, so no write creates them; make
        # them with the first write, once the torrent is really being stored.
        self._empties_made = True
        for fi, f in enumerate(self.meta.files):
            path = self._paths[fi]
            if f.length == 0 and path is not None and not os.path.exists(path):
                try:
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                    self._check_inside(path, f.path)
                    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o644))
                except OSError as exc:
                    raise self._fail("create", path, exc) from None

    # --- the three operations BaseTorrent needs ------------------------------------------

    def _read(self, index: int, offset: int, length: int) -> bytes:
        # Parts joined once at the end: a piece within one file is one
        # pread's bytes, returned as they are (b"".join of one bytes object
        # is that object) -- no growing buffer and copy of 256 KiB per piece
        # hashed or batch served, each a fresh mmap'd allocation to fault in.
        parts: list[bytes] = []
        for s in self.meta.map_piece(index, offset, length):
            path = self._paths[s.file_index]
            if path is None:
                parts.append(bytes(s.length))       # pad bytes are zeros
                continue
            with self._open(s.file_index, create=False) as fd:
                if fd is None:
                    parts.append(bytes(s.length))
                    continue
                pos, left = s.file_offset, s.length
                try:
                    while left:
                        chunk = os.pread(fd, left, pos)
                        if not chunk:
                            parts.append(bytes(left))   # a short file reads as zeros
                            break
                        parts.append(chunk)
                        pos += len(chunk)
                        left -= len(chunk)
                except OSError as exc:
                    raise self._fail("read", path, exc) from None
        return b"".join(parts)

    def _write(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        if not self._empties_made:
            self._make_empty_files()
        view = memoryview(data)
        for s in self.meta.map_piece(index, offset, len(view)):
            chunk, view = view[:s.length], view[s.length:]
            path = self._paths[s.file_index]
            if path is None:
                continue            # pad bytes are zeros: never stored
            with self._open(s.file_index, create=True) as fd:
                assert fd is not None
                pos = s.file_offset
                try:
                    while chunk:
                        n = os.pwrite(fd, chunk, pos)
                        chunk = chunk[n:]
                        pos += n
                except OSError as exc:
                    raise self._fail("write", path, exc) from None
                # Marked after the write, inside the use: a save_resume that
                # took its snapshot before this line fsyncs it next time.
                with self._lock:
                    self._dirty.add(s.file_index)

    def _mark(self, index: int, complete: bool) -> None:
        # The mark holds in memory even when the resume write that may
        # follow fails (StorageError): the piece *is* verified.
        before = index in self.have
        super()._mark(index, complete)
        if before != complete:
            self._resume_dirty = True
            if complete and self.resume_path is not None and \
                    time.monotonic() - self._last_save >= self.resume_interval:
                self.save_resume()

    # --- resume --------------------------------------------------------------------------

    def _file_stamps(self) -> list[list[int]]:
        stamps = []
        for path in self._paths:
            if path is None:
                stamps.append([0, 0])
                continue
            try:
                st = os.stat(path)
                stamps.append([st.st_size, st.st_mtime_ns])
            except FileNotFoundError:
                stamps.append([-1, 0])
            except OSError as exc:
                raise self._fail("stat", path, exc) from None
        return stamps

    def save_resume(self) -> None:
        """Flush the data files and replace the resume file atomically.
        StorageError if that fails; the previous resume file then stays."""
        if self.resume_path is None:
            return
        with self._save_lock:
            self._save_resume(self.resume_path)

    def _save_resume(self, path: str) -> None:
        # The pieces to record are taken first: every one of them was
        # written (and its file marked dirty) before it was marked complete,
        # so the fsyncs below cover all of their bytes.
        have = frozenset(self.have)
        with self._lock:
            dirty, self._dirty = self._dirty, set()
            for fi in dirty:
                self._users[fi] = self._users.get(fi, 0) + 1     # not evicted meanwhile
        try:
            for fi in sorted(dirty):
                entry = self._fds.get(fi)
                if entry is not None:
                    try:
                        os.fsync(entry[0])
                    except OSError as exc:
                        with self._lock:
                            self._dirty |= dirty
                        p = self._paths[fi]
                        assert p is not None
                        raise self._fail("flush", p, exc) from None
        finally:
            with self._lock:
                for fi in dirty:
                    self._users[fi] -= 1
        bits = bytearray(-(-self.meta.num_pieces // 8))
        for i in have:
            bits[i >> 3] |= 0x80 >> (i & 7)
        record = encode({
            b"format": RESUME_FORMAT,
            b"info-hash": self.meta.info_hash,
            b"piece length": self.meta.piece_length,
            b"pieces": self.meta.num_pieces,
            b"verified": bytes(bits),
            b"files": self._file_stamps(),
        })
        tmp = f"{path}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            try:
                view = memoryview(record)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, path)
            dfd = os.open(os.path.dirname(path) or ".", os.O_RDONLY | os.O_CLOEXEC)
            try:
                os.fsync(dfd)
            finally:
                os.close(dfd)
        except OSError as exc:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise self._fail("write the resume file", path, exc) from None
        self._resume_dirty = False
        self._last_save = time.monotonic()

    def _load_resume(self) -> tuple[set[int], list[Any]] | None:
        # Anything wrong with the resume file -- missing, torn, another
        # torrent's -- means "no resume": a full check, never an error.
        if self.resume_path is None:
            return None
        try:
            with open(self.resume_path, "rb") as f:
                data = f.read(_MAX_RESUME_SIZE + 1)
            rec = decode_untrusted(data, max_size=_MAX_RESUME_SIZE)
        except (OSError, BencodeError):
            return None
        m = self.meta
        if not isinstance(rec, dict) or rec.get(b"format") != RESUME_FORMAT \
                or rec.get(b"info-hash") != m.info_hash or rec.get(b"piece length") != m.piece_length \
                or rec.get(b"pieces") != m.num_pieces:
            return None
        bits, files = rec.get(b"verified"), rec.get(b"files")
        if not isinstance(bits, bytes) or len(bits) != -(-m.num_pieces // 8) \
                or not isinstance(files, list) or len(files) != len(m.files):
            return None
        have = {i for i in range(m.num_pieces) if bits[i >> 3] & (0x80 >> (i & 7))}
        return have, files

    def check(self, *, full: bool = False,
              progress: Callable[[int, int], None] | None = None) -> CheckResult:
        """Find the verified pieces: trust the resume file for files that
        did not change since it was written and hash the rest (everything
        when ``full`` or without a usable resume file).  Writes a fresh
        resume file afterwards, so the next open is quick."""
        rec = None if full else self._load_resume()
        self.have.clear()
        if rec is None:
            hashed = self._hash_pieces(range(self.meta.num_pieces), progress)
            resumed = False
        else:
            trusted, recorded = rec
            now = self._file_stamps()
            stale_pieces: set[int] = set()
            for fi, (was, is_) in enumerate(zip(recorded, now)):
                if was != is_:
                    stale_pieces.update(self.meta.file_pieces(fi))
            self.have.update(trusted - stale_pieces)
            hashed = self._hash_pieces(sorted(stale_pieces), progress)
            resumed = True
        self._resume_dirty = True
        if self.resume_path is not None:
            try:
                self.save_resume()
            except StorageError:
                pass    # kept in self.error; what the check found is still true
        return CheckResult(frozenset(self.have), hashed, resumed)

    def delete(self, *, data: bool) -> None:
        """The torrent was removed (call after :meth:`close`): delete its
        resume file and, with ``data``, its files and the directories they
        leave empty.  Only the torrent's own paths are touched, each
        resolved on disk again and skipped unless it is a regular file
        inside the download directory (never a symlink, never the download
        directory itself).  StorageError names the first file that could
        not be deleted (the others are still tried)."""
        super().delete(data=data)
        first: StorageError | None = None
        doomed = [self.resume_path] if self.resume_path is not None else []
        if data:
            doomed += [p for p in self._paths if p is not None]
        for path in doomed:
            try:
                if self._own_regular_file(path):
                    os.unlink(path)
            except OSError as exc:
                first = first or _oserror("delete", path, exc)
        if data:
            self._remove_empty_dirs()
        if first is not None:
            raise first

    def _inside(self, path: str) -> bool:
        real = os.path.realpath(path)
        return real.startswith(self.root + os.sep)

    def _own_regular_file(self, path: str) -> bool:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return False
        if not stat.S_ISREG(st.st_mode):
            return False        # a symlink, a directory, a device: not ours to delete
        if path == self.resume_path:
            return True         # in the resume directory, which we chose
        return self._inside(path)

    def _remove_empty_dirs(self) -> None:
        dirs: set[str] = set()
        for path in self._paths:
            d = os.path.dirname(path) if path is not None else self.root
            while d != self.root and d.startswith(self.root + os.sep):
                dirs.add(d)
                d = os.path.dirname(d)
        for d in sorted(dirs, key=len, reverse=True):      # deepest first
            if os.path.islink(d) or not self._inside(d):
                continue
            with contextlib.suppress(OSError):              # not empty: keep it
                os.rmdir(d)

    def close(self) -> None:
        """Write the resume file if it is out of date, and close the files.
        The files are closed even if the resume file cannot be written (the
        StorageError is raised afterwards)."""
        if self.closed:
            return
        self.closed = True
        err: StorageError | None = None
        if self._resume_dirty or self._dirty:
            try:
                self.save_resume()
            except StorageError as exc:
                err = exc
        with self._lock:
            for fd, _ in self._fds.values():
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
        if err is not None:
            raise err
