"""One error family for every protocol core (the shape of h11's).

A core raises :class:`LocalProtocolError` when *we* asked for something the
protocol cannot express (an announce with a 19-byte hash, a value bencode
has no form for): a bug or bad input on our side, reported to the caller.
It raises (or counts and drops) :class:`RemoteProtocolError` when the
*peer* sent something the protocol does not allow: network input, never
trusted, never a crash.  Both are :class:`ProtocolError`, so a driver can
catch the family in one clause.

Both are also ValueErrors: the errors they replaced were, and callers that
catch ValueError keep working.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError"]


class ProtocolError(Exception):
    """A protocol rule was broken, by us (:class:`LocalProtocolError`) or by
    the peer (:class:`RemoteProtocolError`)."""


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to send something the protocol cannot express."""


class RemoteProtocolError(ProtocolError, ValueError):
    """The peer sent something the protocol does not allow."""
