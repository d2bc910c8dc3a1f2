"""Errors of the trio layer and how engine errors map onto trio's."""

from __future__ import annotations

from _utpkit.errors import NetworkError

from . import _utp

__all__ = ["UTPError", "error_name"]


def error_name(code: int) -> str:
    """The engine's name for an ON_ERROR code (UTP_ECONNRESET, ...)."""
    if 0 <= code < len(_utp.ERROR_NAMES):
        return _utp.ERROR_NAMES[code]
    return f"uTP error {code}"


class UTPError(NetworkError):
    """A uTP connection failed: the peer reset it, refused it, or stopped
    answering.  Raised as the ``__cause__`` of :class:`trio.BrokenResourceError`
    on streams; ``code`` is the engine's error code (``UTP_ECONNRESET``, ...)
    and ``name`` its name."""

    def __init__(self, code: int, message: str | None = None) -> None:
        self.code = code
        self.name = error_name(code)
        super().__init__(message or self.name)


_MESSAGES = {
    _utp.UTP_ECONNREFUSED: "connection refused by {peer}",
    _utp.UTP_ECONNRESET: "connection reset by {peer}",
    _utp.UTP_ETIMEDOUT: "{peer} stopped answering (timed out)",
}


def describe(code: int, peer: str) -> str:
    return _MESSAGES.get(code, "uTP error {code} with {peer}").format(code=code, peer=peer)
