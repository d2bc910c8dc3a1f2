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

Failures of the I/O around the cores -- a uTP connection reset, refused or
timed out, a rendezvous that paired us with nobody, a tracker that answered
with an error -- are :class:`NetworkError`, an OSError (they were OSErrors
before, and carry errno-like meaning), so a program catches everything the
network did to it in one clause: ``except NetworkError``.
"""

from __future__ import annotations

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError", "NetworkError"]


class ProtocolError(Exception):
    """A protocol rule was broken, by us (:class:`LocalProtocolError`) or by
    the peer (:class:`RemoteProtocolError`)."""


class LocalProtocolError(ProtocolError, ValueError):
    """We were asked to send something the protocol cannot express."""


class RemoteProtocolError(ProtocolError, ValueError):
    """The peer sent something the protocol does not allow."""


class NetworkError(OSError):
    """An operation over the network failed (utp.UTPError,
    utp.RendezvousError, tracker.TrackerError)."""
