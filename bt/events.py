"""Download events: one :class:`Notifier` per session, aria2's event model.

Every torrent state change passes through :meth:`bt.torrent.Torrent._settle`,
which tells the session's state listeners; the notifier is one of them and
turns the transitions into aria2's six download events::

    async with bt.open_session(download_dir="dl") as session:
        session.add_listener(lambda ev: print(ev.gid, ev.kind, ev.name))
        async for ev in session.events():        # or iterate instead
            if ev.kind is EventKind.BT_COMPLETE: ...

When each event fires (aria2's semantics, from its ``RequestGroupMan`` and
manual; a "download" is a torrent with its gid):

- ``START`` (``aria2.onDownloadStart``): the download starts taking part in
  the swarm -- after :meth:`~bt.session.Session.add_torrent` (once the
  initial data check is done), and again on every resume after a pause or
  an error.  A recheck of a running download does not start it again.
- ``PAUSE`` (``aria2.onDownloadPause``): a running download is paused.
- ``BT_COMPLETE`` (``aria2.onBtDownloadComplete``): every piece is verified
  and the download goes on seeding.  A torrent added with its data already
  complete gets it right after its ``START``, as aria2 does by default
  after its hash check (``--bt-enable-hook-after-hash-check=true``); a
  pause and resume of a seed does not repeat it; a recheck that finds
  pieces missing re-arms it.
- When a download ends, exactly one of the next three fires, as aria2's
  ``executeStopHook`` decides from the download's result:

  - ``COMPLETE`` (``aria2.onDownloadComplete``): it ended with all its data
    -- for a torrent that means *seeding ended*: removed from the session
    (aria2.remove of a seed is a finished download) or the session closed
    while it was running;
  - ``ERROR`` (``aria2.onDownloadError``): a storage error stopped it (the
    moment it happens; removing it afterwards adds nothing);
  - ``STOP`` (``aria2.onDownloadStop``): removed, or the session closed,
    without all its data.

  A download paused when the session closes gets nothing more (aria2
  keeps paused downloads waiting, not stopped).

Listeners (:meth:`Notifier.add_listener`, also ``session.add_listener``):
a sync callback is called inline, in the order events happen -- it must be
quick (it runs inside the transition, on the event loop); an async one
gets its own worker task in the session's nursery and a bounded queue
(:data:`LISTENER_QUEUE` events; when full the oldest is dropped and
counted), so a slow one only falls behind, never holds up the download.
A listener that raises is logged (logger ``bt.events``) and counted
(``events.listener_errors``); the others and the session go on.

Iterators (:meth:`Notifier.events`): each has a bounded queue too; a
consumer that stops reading loses the *oldest* events first (the newest
say where each download is now) and :attr:`EventStream.dropped` and the
session counter ``events.dropped`` count them.
"""

from __future__ import annotations

import collections
import enum
import inspect
import logging
import time
import weakref
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Union

import trio

from _utpkit.contract import Event, StrEnum

from .torrent import TorrentState

if TYPE_CHECKING:
    from .session import Session
    from .torrent import Torrent, TorrentStatus

__all__ = ["EventKind", "DownloadEvent", "Notifier", "EventStream", "Listener",
           "LISTENER_QUEUE", "STREAM_QUEUE", "CLOSE_GRACE"]

log = logging.getLogger("bt.events")

#: Events an async listener may fall behind by before the oldest is dropped.
LISTENER_QUEUE = 1000
#: Default queue length of :meth:`Notifier.events` iterators.
STREAM_QUEUE = 1000
#: Seconds the session's close waits for async listeners and hook tasks to
#: handle the last events (the ``complete`` / ``stop`` of each running
#: download) before cancelling them.
CLOSE_GRACE = 5.0


class EventKind(StrEnum):
    """aria2's six download events; :attr:`method` is its notification."""
    START = "start"
    PAUSE = "pause"
    STOP = "stop"
    COMPLETE = "complete"
    ERROR = "error"
    BT_COMPLETE = "bt-complete"

    @property
    def method(self) -> str:
        """aria2's JSON-RPC notification name, e.g. ``aria2.onDownloadStart``."""
        return _METHODS[self]

    @property
    def option(self) -> str:
        """aria2's hook option for it, e.g. ``on-download-start``."""
        return "on-bt-download-complete" if self is EventKind.BT_COMPLETE \
            else f"on-download-{self.value}"


_METHODS = {EventKind.START: "aria2.onDownloadStart", EventKind.PAUSE: "aria2.onDownloadPause",
            EventKind.STOP: "aria2.onDownloadStop",
            EventKind.COMPLETE: "aria2.onDownloadComplete",
            EventKind.ERROR: "aria2.onDownloadError",
            EventKind.BT_COMPLETE: "aria2.onBtDownloadComplete"}


@dataclass(frozen=True, slots=True)
class DownloadEvent(Event):
    """One download event: the download's gid, what happened, its status
    when it happened and the wall-clock time (``time.time()``, for logs and
    RPC clients).  ``torrent`` is the download itself (for its files and
    save path: what hooks need)."""
    gid: str
    kind: EventKind
    name: str
    status: "TorrentStatus"
    timestamp: float
    torrent: "Torrent" = field(compare=False, repr=False)

    @property
    def method(self) -> str:
        """aria2's notification name for this event."""
        return self.kind.method


#: A listener: ``cb(event)``, either a plain function or an async one.
Listener = Callable[[DownloadEvent], Union[None, Awaitable[None]]]


def _is_async(cb: Any) -> bool:
    while hasattr(cb, "func"):                     # functools.partial
        cb = cb.func
    return inspect.iscoroutinefunction(cb) or inspect.iscoroutinefunction(
        getattr(cb, "__call__", None))


class _Bounded:
    """A queue that drops its oldest entry when full, counting drops."""

    def __init__(self, notifier: "Notifier", maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError(f"queue length must be >= 1, not {maxlen!r}")
        self._notifier = notifier
        self.queue: collections.deque[DownloadEvent] = collections.deque()
        self.maxlen = maxlen
        #: Events dropped from this queue because its reader fell behind.
        self.dropped = 0
        self._wake = trio.Event()

    def push(self, event: DownloadEvent) -> None:
        if len(self.queue) >= self.maxlen:
            self.queue.popleft()
            self.dropped += 1
            self._notifier.counters["events.dropped"] += 1
        self.queue.append(event)
        self._wake.set()

    def _ended(self) -> bool:
        return False

    async def _wait(self) -> bool:
        """Wait for an event; False if none will come."""
        while not self.queue:
            if self._ended():
                return False
            await self._wake.wait()
            self._wake = trio.Event()
        return True


class _AsyncListener(_Bounded):
    """An async listener's queue and its worker task (events in order, one
    at a time)."""

    def __init__(self, notifier: "Notifier", cb: Listener, maxlen: int) -> None:
        super().__init__(notifier, maxlen)
        self.cb = cb
        self.busy = False
        self.retired = False
        self._idle = trio.Event()

    async def run(self) -> None:
        while await self._wait() and not self.retired:
            await self._call(self.queue.popleft())

    def _ended(self) -> bool:
        return self.retired

    async def _call(self, event: DownloadEvent) -> None:
        self.busy = True
        try:
            await self._notifier._call(self.cb, event)
        finally:
            self.busy = False
            self._idle.set()
            self._idle = trio.Event()

    async def drain(self) -> None:
        """At close: take over from the worker (after its current call) and
        deliver what is queued."""
        self.retired = True
        self._wake.set()
        while self.busy:
            await self._idle.wait()
        while self.queue:
            await self._call(self.queue.popleft())


class EventStream(_Bounded):
    """``async for event in session.events():`` -- see :meth:`Notifier.events`.
    Registered when made (no event between making and iterating is lost);
    unregistered by :meth:`close`, at the end of an ``async with`` block, or
    when garbage collected."""

    def __aiter__(self) -> "EventStream":
        return self

    async def __anext__(self) -> DownloadEvent:
        if not await self._wait():
            raise StopAsyncIteration
        return self.queue.popleft()

    _closed = False

    def _ended(self) -> bool:
        return self._closed or self._notifier._closed

    def close(self) -> None:
        """Stop receiving events; the iteration ends once the queued ones
        are read."""
        self._closed = True
        self._notifier._streams.discard(self)
        self._wake.set()

    async def __aenter__(self) -> "EventStream":
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Notifier:
    """The session's notifier: see the module docstring.  Made by the
    session (``session.notifier``); registered as one of its state
    listeners."""

    def __init__(self, session: "Session", nursery: trio.Nursery) -> None:
        self._session = session
        self._nursery = nursery
        self.counters = session.counters
        self._sync: list[Listener] = []
        self._async: list[_AsyncListener] = []
        self._streams: weakref.WeakSet[EventStream] = weakref.WeakSet()
        self._running: set[str] = set()         # gids started and not ended
        self._started: set[str] = set()         # gids ever started
        self._seeded: set[str] = set()          # gids whose BT_COMPLETE was told
        self._tasks = 0
        self._tasks_done = trio.Event()
        self._closed = False            # no more events expected: iterators end
        self._finished = False          # the close is over: no tasks any more
        #: Seconds :meth:`aclose` waits for the last events' handlers.
        self.close_grace = CLOSE_GRACE

    # ---- listeners -----------------------------------------------------------------------

    def add_listener(self, cb: Listener, *, queue: int = LISTENER_QUEUE) -> None:
        """Call ``cb(event)`` for every event from now on.  A coroutine
        function runs in its own task with a queue of ``queue`` events
        (oldest dropped and counted when full); a plain function is called
        inline and must not block.  Adding the same callable twice (by
        ``==``: a bound method made again is the same) is a ValueError."""
        if cb in self._sync or any(al.cb == cb for al in self._async):
            raise ValueError(f"listener {cb!r} is already registered")
        if _is_async(cb):
            al = _AsyncListener(self, cb, queue)
            self._async.append(al)
            self._nursery.start_soon(al.run)
        else:
            self._sync.append(cb)

    def remove_listener(self, cb: Listener) -> None:
        """Stop calling ``cb`` (events already queued for an async one are
        dropped).  ValueError if it is not registered."""
        if cb in self._sync:
            self._sync.remove(cb)
            return
        al = next((al for al in self._async if al.cb == cb), None)
        if al is None:
            raise ValueError(f"listener {cb!r} is not registered")
        self._async.remove(al)
        al.retired = True
        al.queue.clear()
        al._wake.set()

    def events(self, *, queue: int = STREAM_QUEUE) -> EventStream:
        """An async iterator over the events from now on, with a queue of
        ``queue`` events: a reader that falls behind loses the oldest
        (counted in :attr:`EventStream.dropped` and ``events.dropped``).
        The iteration ends once the session has closed and the queue is
        read."""
        stream = EventStream(self, queue)
        self._streams.add(stream)
        return stream

    def start_soon(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of the session, one the close waits
        for (up to :attr:`close_grace`): for listeners that start work of
        their own, such as hook commands.  After the close it is dropped
        (logged): nothing runs any more."""
        if self._finished:
            log.warning("session closed: %r not started", fn)
            return
        self._tasks += 1
        self._nursery.start_soon(self._task, fn, args)

    async def _task(self, fn: Callable[..., Awaitable[Any]], args: tuple[Any, ...]) -> None:
        try:
            await fn(*args)
        except Exception:
            self.counters["events.listener_errors"] += 1
            log.exception("event task %r failed", fn)
        finally:
            self._tasks -= 1
            if not self._tasks:
                self._tasks_done.set()
                self._tasks_done = trio.Event()

    async def _call(self, cb: Listener, event: DownloadEvent) -> None:
        try:
            await cb(event)         # type: ignore[misc]
        except Exception:
            self.counters["events.listener_errors"] += 1
            log.exception("event listener %r failed on %s %s", cb, event.kind, event.gid)

    # ---- events ------------------------------------------------------------------------

    def emit(self, torrent: "Torrent", kind: EventKind) -> DownloadEvent:
        """Tell every listener and iterator that ``kind`` happened to
        ``torrent`` (the session does this; public for tests and drivers)."""
        event = DownloadEvent(gid=torrent.gid, kind=kind, name=torrent.meta.name,
                              status=torrent.status(), timestamp=time.time(), torrent=torrent)
        self.counters[f"events.{kind.value}"] += 1
        for cb in list(self._sync):
            try:
                cb(event)
            except Exception:
                self.counters["events.listener_errors"] += 1
                log.exception("event listener %r failed on %s %s", cb, kind, event.gid)
        for al in list(self._async):
            al.push(event)
        for stream in list(self._streams):
            stream.push(event)
        return event

    def state_changed(self, torrent: "Torrent", old: TorrentState | None,
                      new: TorrentState) -> None:
        """The session's state listener: aria2's events from a transition."""
        gid = torrent.gid
        running = gid in self._running
        if new in (TorrentState.DOWNLOADING, TorrentState.SEEDING):
            if new is TorrentState.DOWNLOADING:
                self._seeded.discard(gid)           # (a recheck found pieces missing)
            if not running:
                self._running.add(gid)
                self._started.add(gid)
                self.emit(torrent, EventKind.START)
            if new is TorrentState.SEEDING and gid not in self._seeded:
                self._seeded.add(gid)
                self.emit(torrent, EventKind.BT_COMPLETE)
        elif new is TorrentState.PAUSED:
            if running:
                self._running.discard(gid)
                self.emit(torrent, EventKind.PAUSE)
        elif new is TorrentState.ERROR:
            self._running.discard(gid)
            self.emit(torrent, EventKind.ERROR)
        elif new is TorrentState.REMOVED:
            self._running.discard(gid)
            self._seeded.discard(gid)
            if old is not TorrentState.ERROR and gid in self._started:
                self._end(torrent)
            self._started.discard(gid)

    def _end(self, torrent: "Torrent") -> None:
        self.emit(torrent, EventKind.COMPLETE if torrent.finished else EventKind.STOP)

    async def aclose(self) -> None:
        """The session is closing: ``complete`` or ``stop`` for each running
        download, then up to :attr:`close_grace` seconds for the async
        listeners to take their queued events and for tasks from
        :meth:`start_soon` to end (shielded: runs even when the session is
        cancelled); then iterators end."""
        with trio.CancelScope(shield=True) as scope:
            scope.deadline = trio.current_time() + self.close_grace
            async with trio.open_nursery() as nursery:
                self._nursery = nursery             # tasks started from now on
                for torrent in list(self._session.torrents.values()):
                    if torrent.gid in self._running:
                        self._running.discard(torrent.gid)
                        self._end(torrent)
                self._closed = True
                for al in list(self._async):
                    nursery.start_soon(al.drain)
                while self._tasks:
                    await self._tasks_done.wait()
        self._finished = True
        if scope.cancelled_caught:
            log.warning("session closing: event handlers still busy after %.1f s were "
                        "cancelled", self.close_grace)
        for stream in list(self._streams):
            stream._wake.set()                      # readers see the end
