"""Torrent storage behind three levels (anacrolix/torrent's storage shape):

1. a **backend** opens a torrent: ``backend.open_torrent(meta) -> TorrentStorage``;
2. a torrent hands out pieces: ``torrent.piece(i) -> Piece``;
3. a piece reads, writes, verifies and is marked complete:
   ``read_at(offset, n)``, ``write_at(offset, data)``, ``hash_ok()``,
   ``mark_complete()``.

Two backends: :class:`bt.storage_file.FileStorage` (real files, pread /
pwrite, sparse, a resume file) and :class:`MemoryStorage` here (a dict of
pieces, for simulated swarms and tests).  Every method is a plain blocking
call: a driver runs them in a worker thread (:class:`AsyncTorrentStorage`
does, with a limiter), so disk latency and SHA-1 never stall the event
loop.  Nothing here imports trio until an async wrapper is used.

A storage never trusts a piece it has not hashed: :meth:`Piece.hash_ok`
reads the piece back from where it is stored and compares its SHA-1 with
the metainfo, and only then may the caller :meth:`Piece.mark_complete` it.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING, Any, Callable, Protocol, Sequence, TypeVar

from .metainfo import Metainfo

if TYPE_CHECKING:
    import trio

__all__ = ["StorageError", "StorageBackend", "TorrentStorage", "Piece", "CheckResult",
           "MemoryStorage", "MemoryTorrent", "AsyncTorrentStorage", "BaseTorrent"]

T = TypeVar("T")


class StorageError(Exception):
    """Reading or writing a torrent's data failed: disk full, no permission,
    an unsafe path on disk.  The message is one line naming the file and the
    cause; ``path`` and ``errno`` (None when not an OS error) say the same
    for programs.  Verified pieces stay verified: the resume file is only
    ever replaced atomically."""

    def __init__(self, message: str, *, path: str | None = None, errno: int | None = None) -> None:
        super().__init__(message)
        self.path = path
        self.errno = errno


class CheckResult:
    """What :meth:`TorrentStorage.check` found: the verified pieces, how
    many pieces it hashed to learn that, and whether it trusted a resume
    file (``resumed``) for the rest."""

    __slots__ = ("have", "hashed", "resumed")

    def __init__(self, have: frozenset[int], hashed: int, resumed: bool) -> None:
        self.have = have
        self.hashed = hashed
        self.resumed = resumed

    def __repr__(self) -> str:
        return f"CheckResult(have={len(self.have)} pieces, hashed={self.hashed}, resumed={self.resumed})"


class Piece:
    """One piece of an open torrent (level 3).  Cheap to create; holds no
    resources.  ``read_at``/``write_at`` address bytes within the piece."""

    __slots__ = ("_t", "index", "length")

    def __init__(self, torrent: BaseTorrent, index: int) -> None:
        self._t = torrent
        self.index = index
        self.length = torrent.meta.piece_size(index)

    def _check(self, offset: int, length: int) -> None:
        if offset < 0 or length < 0 or offset + length > self.length:
            raise ValueError(f"range {offset}+{length} outside piece {self.index} of {self.length} bytes")

    def read_at(self, offset: int, length: int) -> bytes:
        """``length`` bytes at ``offset`` of the piece (zeros where nothing was written)."""
        self._check(offset, length)
        return self._t._read(self.index, offset, length)

    def write_at(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        """Store ``data`` at ``offset``.  StorageError when the disk refuses.

        A verified piece is never overwritten (a late duplicate block from a
        peer would otherwise corrupt data already checked): ValueError until
        :meth:`mark_not_complete` is called."""
        self._check(offset, len(data))
        if self.index in self._t.have:
            raise ValueError(f"piece {self.index} is verified; mark_not_complete() it before writing")
        self._t._write(self.index, offset, data)

    def hash_ok(self) -> bool:
        """Whether the stored bytes hash to the metainfo's SHA-1 (BEP 3).
        Reads the whole piece back: what is verified is what is stored."""
        self._t.statistics_hashed += 1
        return hashlib.sha1(self._t._read(self.index, 0, self.length)).digest() == \
            self._t.meta.piece_hash(self.index)

    def mark_complete(self) -> None:
        """Record the piece as verified (call after :meth:`hash_ok` said so)."""
        self._t._mark(self.index, True)

    def mark_not_complete(self) -> None:
        """Forget that the piece was verified (a failed recheck, a force-recheck)."""
        self._t._mark(self.index, False)

    @property
    def complete(self) -> bool:
        return self.index in self._t.have


class TorrentStorage(Protocol):
    """One open torrent's data (level 2)."""

    meta: Metainfo
    have: set[int]
    error: StorageError | None

    def piece(self, index: int) -> Piece: ...
    def check(self, *, full: bool = False,
              progress: Callable[[int, int], None] | None = None) -> CheckResult: ...
    def save_resume(self) -> None: ...
    def close(self) -> None: ...
    def delete(self, *, data: bool) -> None: ...


class StorageBackend(Protocol):
    """Where torrents' data lives (level 1)."""

    def open_torrent(self, meta: Metainfo) -> TorrentStorage: ...


class BaseTorrent:
    """What both backends share: the piece objects, the set of verified
    pieces, and a recheck.  A backend supplies ``_read``/``_write`` of bytes
    within a piece and may override ``_mark``/``check``/``save_resume``."""

    def __init__(self, meta: Metainfo) -> None:
        self.meta = meta
        self.have: set[int] = set()
        #: Pieces hashed since the torrent was opened (by hash_ok or check):
        #: lets a test or a status line see that a resume avoided a rehash.
        self.statistics_hashed = 0
        #: The last StorageError (the torrent's error state), or None.
        self.error: StorageError | None = None
        self.closed = False

    def piece(self, index: int) -> Piece:
        if not 0 <= index < self.meta.num_pieces:
            raise IndexError(f"piece {index} out of range 0..{self.meta.num_pieces - 1}")
        return Piece(self, index)

    def _read(self, index: int, offset: int, length: int) -> bytes:  # pragma: no cover
        raise NotImplementedError

    def _write(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> None:  # pragma: no cover
        raise NotImplementedError

    def _mark(self, index: int, complete: bool) -> None:
        if complete:
            self.have.add(index)
        else:
            self.have.discard(index)

    def _hash_pieces(self, indices: Any, progress: Callable[[int, int], None] | None) -> int:
        indices = list(indices)
        for n, i in enumerate(indices):
            p = self.piece(i)
            self._mark(i, p.hash_ok())
            if progress is not None:
                progress(n + 1, len(indices))
        return len(indices)

    def check(self, *, full: bool = False,
              progress: Callable[[int, int], None] | None = None) -> CheckResult:
        """Hash every piece and return what is there (the memory backend has
        no resume file: a check is always full)."""
        hashed = self._hash_pieces(range(self.meta.num_pieces), progress)
        return CheckResult(frozenset(self.have), hashed, False)

    def save_resume(self) -> None:
        """Persist the verified pieces (nothing to do without a resume file)."""

    def close(self) -> None:
        self.closed = True

    def delete(self, *, data: bool) -> None:
        """After :meth:`close`, when the torrent is removed: forget its
        resume record and, with ``data``, its stored bytes."""
        self.have.clear()


class MemoryTorrent(BaseTorrent):
    """A torrent held in memory, one bytearray per piece written.  For
    simulated swarms: many peers' storages in one process, no disk."""

    def __init__(self, meta: Metainfo) -> None:
        super().__init__(meta)
        self._pieces: dict[int, bytearray] = {}

    def _read(self, index: int, offset: int, length: int) -> bytes:
        buf = self._pieces.get(index)
        if buf is None:
            return bytes(length)
        return bytes(buf[offset:offset + length])

    def _write(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        buf = self._pieces.get(index)
        if buf is None:
            buf = self._pieces[index] = bytearray(self.meta.piece_size(index))
        buf[offset:offset + len(data)] = data

    def delete(self, *, data: bool) -> None:
        super().delete(data=data)
        if data:
            self._pieces.clear()


class MemoryStorage:
    """The memory backend.  ``open_torrent`` of the same infohash twice
    returns the same data (a simulated restart keeps what was stored,
    though not what was verified: that needs a check, as after a crash)."""

    def __init__(self) -> None:
        self._data: dict[bytes, dict[int, bytearray]] = {}

    def open_torrent(self, meta: Metainfo) -> MemoryTorrent:
        t = MemoryTorrent(meta)
        t._pieces = self._data.setdefault(meta.info_hash, {})
        return t


class AsyncTorrentStorage:
    """Awaitable wrappers over a :class:`TorrentStorage`: each call runs the
    blocking method in a trio worker thread, at most ``limiter`` at a time
    (share one CapacityLimiter across a session's torrents to bound its disk
    threads).

    Cancellation: a disk call in a thread cannot be interrupted; a cancelled
    await still waits for it, so a write is never half-recorded.
    Error handling: StorageError from the thread is raised here."""

    def __init__(self, storage: TorrentStorage, limiter: trio.CapacityLimiter | None = None) -> None:
        import trio
        self.storage = storage
        self.limiter = limiter if limiter is not None else trio.CapacityLimiter(4)

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        import trio
        return await trio.to_thread.run_sync(fn, *args, limiter=self.limiter)

    async def read(self, index: int, offset: int, length: int) -> bytes:
        return await self._run(lambda: self.storage.piece(index).read_at(offset, length))

    async def read_many(self, blocks: list[tuple[int, int, int]]) -> list[bytes]:
        """Several ``(index, offset, length)`` reads in one thread hop (a
        seed answering a batch of requests)."""
        return await self._run(lambda: [self.storage.piece(i).read_at(o, n) for i, o, n in blocks])

    async def write(self, index: int, offset: int, data: bytes | bytearray | memoryview) -> None:
        await self._run(lambda: self.storage.piece(index).write_at(offset, data))

    async def write_many(self, blocks: Sequence[tuple[int, int, bytes | bytearray | memoryview]]
                         ) -> None:
        """Several ``(index, offset, data)`` writes in one thread hop (the
        blocks of one receive: a hop per 16 KiB block costs more than the
        write on a busy machine)."""
        def run() -> None:
            for index, offset, data in blocks:
                self.storage.piece(index).write_at(offset, data)
        await self._run(run)

    async def verify(self, index: int) -> bool:
        """Hash piece ``index``; mark it complete when it matches, not
        complete when it does not.  Returns whether it matched."""
        def run() -> bool:
            p = self.storage.piece(index)
            ok = p.hash_ok()
            if ok:
                p.mark_complete()
            else:
                p.mark_not_complete()
            return ok
        return await self._run(run)

    async def check(self, *, full: bool = False,
                    progress: Callable[[int, int], None] | None = None) -> CheckResult:
        return await self._run(lambda: self.storage.check(full=full, progress=progress))

    async def save_resume(self) -> None:
        await self._run(self.storage.save_resume)

    async def aclose(self) -> None:
        await self._run(self.storage.close)

    async def delete(self, *, data: bool) -> None:
        await self._run(lambda: self.storage.delete(data=data))
