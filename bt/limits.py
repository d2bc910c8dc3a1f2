"""Rate limits: two token buckets (bt.ratelimit), one for upload and one
for download.  The session has one pair, shared by every connection of
every torrent; each torrent has its own pair whose ``parent`` is the
session's, so a connection is held to both (aria2's per-download
``max-download-limit`` under its ``max-overall-download-limit``).  Both
change while they run.

What is counted: upload, the payload of every block we send (the
messages around it are a few bytes each); download, every byte read from
a peer's stream.  Where it is applied (bt.peer): a connection's server
waits for tokens before each block it sends, and its reader waits for a
positive bucket before each read and reads no more than the bucket's
burst, so unread bytes push back on the sender (TCP's window, uTP's
receive window) instead of piling up in memory.

The clock is trio's (``trio.current_time()``), so a test on a virtual
clock sees the limits in virtual time.
"""

from __future__ import annotations

import trio

from .ratelimit import TokenBucket

__all__ = ["RateLimits", "BURST_SECONDS"]

#: A bucket holds this many seconds of its rate (at least one block): small
#: enough that a transfer of a few seconds keeps within a few percent of
#: the limit, large enough that a fast limit is not a stream of tiny sleeps.
BURST_SECONDS = 0.1


def _burst(rate: float | None) -> float | None:
    return None if not rate else max(16384.0, rate * BURST_SECONDS)


class RateLimits:
    """``upload`` / ``download`` in bytes per second; None or 0 means no
    limit.  ``parent``: limits that also apply (a torrent's parent is its
    session's).  Made by :func:`bt.session.open_session` (change them with
    :meth:`bt.session.Session.set_limits`) and by each torrent
    (:meth:`bt.torrent.Torrent.set_limits`)."""

    def __init__(self, upload: float | None = None, download: float | None = None, *,
                 parent: RateLimits | None = None) -> None:
        now = trio.current_time()
        self.up = TokenBucket(upload, now, burst=_burst(upload))
        self.down = TokenBucket(download, now, burst=_burst(download))
        self.parent = parent
        #: this one and its parents: fixed at creation, walked on every
        #: read and every block sent
        self._chain: tuple[RateLimits, ...] = (self, *(parent._chain if parent else ()))

    def set(self, **limits: float | None) -> None:
        """New limits, ``upload=`` and/or ``download=`` (None: unlimited),
        effective at once (a waiting connection recomputes its wait within
        a sleep of at most 0.1 s)."""
        for name, rate in limits.items():
            bucket = {"upload": self.up, "download": self.down}[name]
            bucket.set_rate(rate, burst=_burst(rate))

    @property
    def upload(self) -> float | None:
        return self.up.rate

    @property
    def download(self) -> float | None:
        return self.down.rate

    # ---- upload: before each block -------------------------------------------------------

    @property
    def upload_limited(self) -> bool:
        return any(not lim.up.unlimited for lim in self._chain)

    def upload_ready(self, n: int) -> bool:
        """Take ``n`` tokens now if every bucket of the chain allows (then
        send at once); take none otherwise."""
        now = trio.current_time()
        if any(lim.up.time_until(now) > 0 for lim in self._chain):
            return False
        for lim in self._chain:
            lim.up.consume(n, now)
        return True

    async def take_upload(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent, and take them."""
        while not self.upload_ready(n):
            now = trio.current_time()
            await trio.sleep(min(0.1, max(lim.up.time_until(now) for lim in self._chain)))

    # ---- download: around each read ------------------------------------------------------

    def read_size(self, default: int) -> int:
        """How much to read at once: ``default``, or under a limit half the
        bucket's burst (at least one block), so the bytes read ahead of the
        tokens stay small."""
        size = default
        for lim in self._chain:
            if not lim.down.unlimited:
                size = min(size, max(16384, int(lim.down.burst / 2)))
        return size

    async def wait_download(self) -> None:
        """Wait until every download bucket of the chain is out of debt."""
        while True:
            now = trio.current_time()
            delay = max(lim.down.time_until(now) for lim in self._chain)
            if delay <= 0:
                return
            await trio.sleep(min(0.1, delay))

    def downloaded(self, n: int) -> None:
        """``n`` bytes were read: pay for them in every bucket of the chain
        (the debt delays the next read)."""
        if n:
            now = trio.current_time()
            for lim in self._chain:
                lim.down.consume(n, now)
