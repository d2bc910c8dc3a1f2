"""A token bucket fed ``now``: the global upload and download rate limits.

``rate`` bytes per second refill the bucket up to ``burst`` bytes; a
transfer takes tokens before it moves bytes.  The bucket may go into debt
(a whole block is sent once the bucket is positive, and the debt delays
the next), so a limit never splits a 16 KiB block yet holds on average:
over any interval T the bytes granted are at most burst + rate x T plus one
block.  Nothing reads a clock; the driver passes ``now`` and sleeps until
:meth:`TokenBucket.time_until`.
"""

from __future__ import annotations

from _utpkit.errors import LocalProtocolError

__all__ = ["TokenBucket"]


class TokenBucket:
    """``rate`` None (or 0) means unlimited.  ``burst`` defaults to a
    quarter of a second of rate, at least one 16 KiB block."""

    def __init__(self, rate: float | None, now: float, *, burst: float | None = None) -> None:
        self._now = now
        self._tokens = 0.0
        self.set_rate(rate, burst=burst)
        self._tokens = self.burst

    def set_rate(self, rate: float | None, *, burst: float | None = None) -> None:
        if rate is not None and rate < 0:
            raise LocalProtocolError(f"rate must be >= 0 or None, not {rate}")
        self.rate = rate or None
        if self.rate is None:
            self.burst = float("inf")
        else:
            self.burst = float(burst) if burst is not None else max(16384.0, self.rate / 4)
        self._tokens = min(self._tokens, self.burst)

    @property
    def unlimited(self) -> bool:
        return self.rate is None

    def _refill(self, now: float) -> None:
        if now > self._now:
            if self.rate is not None:
                self._tokens = min(self.burst, self._tokens + (now - self._now) * self.rate)
            self._now = now

    def available(self, now: float) -> float:
        """Tokens in the bucket (negative while in debt)."""
        self._refill(now)
        return float("inf") if self.rate is None else self._tokens

    def try_consume(self, n: int, now: float) -> bool:
        """Take ``n`` tokens if the bucket is positive (it may go into
        debt); False if the caller must wait (:meth:`time_until`)."""
        self._refill(now)
        if self.rate is None:
            return True
        if self._tokens <= 0:
            return False
        self._tokens -= n
        return True

    def consume(self, n: int, now: float) -> None:
        """Take ``n`` tokens whatever the bucket holds (bytes that already
        moved: a receive that must be paid for; the debt delays the next)."""
        self._refill(now)
        if self.rate is not None:
            self._tokens -= n

    def time_until(self, now: float) -> float:
        """Seconds until :meth:`try_consume` can succeed."""
        self._refill(now)
        if self.rate is None or self._tokens > 0:
            return 0.0
        return (-self._tokens) / self.rate + 1e-9
