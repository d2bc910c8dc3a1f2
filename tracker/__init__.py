"""tracker -- a BEP 15 UDP tracker client.

What it is: :class:`UDPTrackerProtocol`, the protocol as a sans-I/O state
machine (connect, announce, scrape, the 15 * 2^n retransmission schedule,
connection-id reuse for one minute, IPv4 and IPv6 peer lists), and
:func:`open_tracker_client`, its trio driver over a :class:`utp.Endpoint`'s
shared UDP socket, so the tracker records the port that uTP peers can
reach us on (through a NAT: the mapping).

What it is not: an HTTP tracker client, or a tracker.
"""

from _utpkit.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

from ._core import (
    CONNECTION_ID_LIFETIME, EVENT_COMPLETED, EVENT_NONE, EVENT_STARTED, EVENT_STOPPED,
    AnnounceEvent, Event, RequestPhase, RequestTimedOut, ScrapeResult, TrackerAnnounceResult,
    TrackerFailure, UDPTrackerProtocol,
)
from ._core import AnnounceResult  # noqa: F401  (deprecated name of TrackerAnnounceResult)
from ._trio import TrackerClient, TrackerError, open_tracker_client, parse_tracker_url, resolve_tracker

__all__ = [
    "UDPTrackerProtocol", "TrackerAnnounceResult", "ScrapeResult", "TrackerFailure",
    "RequestTimedOut", "Event", "AnnounceEvent", "RequestPhase", "ProtocolError",
    "LocalProtocolError", "RemoteProtocolError", "CONNECTION_ID_LIFETIME", "EVENT_NONE", "EVENT_COMPLETED",
    "EVENT_STARTED", "EVENT_STOPPED", "TrackerClient", "TrackerError", "open_tracker_client",
    "parse_tracker_url", "resolve_tracker",
]
