"""The session's global rate limits: two token buckets (bt.ratelimit), one
for upload and one for download, shared by every connection of every
torrent of a session and changeable while it runs.

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
    limit.  Made by :func:`bt.session.open_session`; change them with
    :meth:`bt.session.Session.set_limits`."""

    def __init__(self, upload: float | None = None, download: float | None = None) -> None:
        now = trio.current_time()
        self.up = TokenBucket(upload, now, burst=_burst(upload))
        self.down = TokenBucket(download, now, burst=_burst(download))

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
        return not self.up.unlimited

    def upload_ready(self, n: int) -> bool:
        """Take ``n`` tokens now if the bucket allows (then send at once)."""
        return self.up.try_consume(n, trio.current_time())

    async def take_upload(self, n: int) -> None:
        """Wait until ``n`` bytes may be sent, and take them."""
        while not self.up.try_consume(n, trio.current_time()):
            await trio.sleep(min(0.1, self.up.time_until(trio.current_time())))

    # ---- download: around each read ------------------------------------------------------

    def read_size(self, default: int) -> int:
        """How much to read at once: ``default``, or under a limit half the
        bucket's burst (at least one block), so the bytes read ahead of the
        tokens stay small."""
        if self.down.unlimited:
            return default
        return max(16384, min(default, int(self.down.burst / 2)))

    async def wait_download(self) -> None:
        """Wait until the download bucket is out of debt."""
        while True:
            delay = self.down.time_until(trio.current_time())
            if delay <= 0:
                return
            await trio.sleep(min(0.1, delay))

    def downloaded(self, n: int) -> None:
        """``n`` bytes were read: pay for them (the debt delays the next read)."""
        if n:
            self.down.consume(n, trio.current_time())
