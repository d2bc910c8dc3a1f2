"""The BEP 15 UDP tracker protocol, sans-I/O.

:class:`UDPTrackerProtocol` talks to one tracker address; it is a
:class:`~_utpkit.contract.DatagramCore`, like the DHT's core.  It is driven
by three sources only, as aioquic's connection is: user calls
(:meth:`~UDPTrackerProtocol.announce`, :meth:`~UDPTrackerProtocol.scrape`),
datagrams (:meth:`~UDPTrackerProtocol.receive_datagram`) and the timer
(:meth:`~UDPTrackerProtocol.handle_timer`); it never reads a clock, draws
unseeded randomness or touches a socket.  Output:
:meth:`~UDPTrackerProtocol.datagrams_to_send` (each to the tracker's
address) and :meth:`~UDPTrackerProtocol.next_event`.

From BEP 15:

- every request needs a connection id, got with a connect exchange; a
  client may use one for 1 minute after receiving it (the tracker accepts
  it for 2), so one connect serves every request of that minute;
- a request (connect, announce or scrape) without an answer is sent again
  after 15 * 2^n seconds, n = 0, 1, ... 8 (3840 s); after that it fails.
  ``retry_base`` and ``max_retries`` shorten this for tests and for callers
  with a deadline;
- an announce made over IPv6 is answered with 18-byte peers (16-byte
  address, port), over IPv4 with 6-byte ones;
- an answer whose transaction id we did not send, or that is malformed, is
  dropped and counted, never trusted.
"""

from __future__ import annotations

import enum
import ipaddress
import random
import struct
from dataclasses import dataclass, field
from typing import Any

from _utpkit.addr import addr_key
from _utpkit.contract import Address, StrEnum
from _utpkit.contract import Event as _CoreEvent
from _utpkit.errors import LocalProtocolError

__all__ = [
    "UDPTrackerProtocol", "TrackerAnnounceResult", "ScrapeResult",
    "TrackerFailure", "RequestTimedOut", "Event", "AnnounceEvent", "RequestPhase", "EVENT_NONE",
    "EVENT_COMPLETED", "EVENT_STARTED", "EVENT_STOPPED", "PROTOCOL_ID", "CONNECTION_ID_LIFETIME",
    "LocalProtocolError",
]

PROTOCOL_ID = 0x41727101980
ACTION_CONNECT, ACTION_ANNOUNCE, ACTION_SCRAPE, ACTION_ERROR = 0, 1, 2, 3


class AnnounceEvent(enum.IntEnum):
    """The ``event`` field of an announce (BEP 15)."""
    NONE = 0
    COMPLETED = 1
    STARTED = 2
    STOPPED = 3


# The names before AnnounceEvent (kept: they are the BEP's own spelling).
EVENT_NONE, EVENT_COMPLETED, EVENT_STARTED, EVENT_STOPPED = (
    AnnounceEvent.NONE, AnnounceEvent.COMPLETED, AnnounceEvent.STARTED, AnnounceEvent.STOPPED)
CONNECTION_ID_LIFETIME = 60.0   # BEP 15: the client may use it for one minute
DEFAULT_RETRY_BASE = 15.0       # BEP 15: 15 * 2^n seconds
DEFAULT_MAX_RETRIES = 8         # ... n up to 8 (3840 s)
MAX_SCRAPE_HASHES = 74          # BEP 15: about 74 fit in one UDP packet


class RequestPhase(StrEnum):
    """A request waits for a connection id, then is sent (and resent)."""
    WAITING = "waiting"
    SENT = "sent"


class Event(_CoreEvent):
    """Base of the events :meth:`UDPTrackerProtocol.next_event` returns;
    each carries the ``request_id`` :meth:`~UDPTrackerProtocol.announce` or
    :meth:`~UDPTrackerProtocol.scrape` returned."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class TrackerAnnounceResult(Event):
    """A tracker's answer to an announce: its peer list.  (Not the DHT's
    :class:`dht.DHTAnnounceResult`, which counts the nodes that stored us.)"""
    request_id: int
    interval: int
    leechers: int
    seeders: int
    peers: tuple[tuple[str, int], ...]


# The name before the DHT's result got its own (deprecated; kept working).
AnnounceResult = TrackerAnnounceResult


@dataclass(frozen=True, slots=True)
class ScrapeResult(Event):
    request_id: int
    # One (seeders, completed, leechers) per requested hash, in order.
    files: tuple[tuple[int, int, int], ...]


@dataclass(frozen=True, slots=True)
class TrackerFailure(Event):
    """The tracker answered with an error (action 3)."""
    request_id: int
    message: str


@dataclass(frozen=True, slots=True)
class RequestTimedOut(Event):
    """No answer after the last retransmission."""
    request_id: int
    sent: int
    waited: float



@dataclass(slots=True)
class _Request:
    request_id: int
    action: int
    body: bytes                 # the part after connection id, action, tid
    tid: int = 0
    tries: int = 0              # sends so far of the current packet
    deadline: float | None = None
    first_sent: float | None = None
    total_sent: int = 0
    hashes: int = 0
    phase: RequestPhase = RequestPhase.WAITING
    extra: dict[str, Any] = field(default_factory=dict)


class UDPTrackerProtocol:
    """BEP 15 with the tracker at ``address`` (an ``(ip, port)`` literal).
    ``ipv6`` says the tracker is reached over IPv6 (its announce answers
    then carry 18-byte peers); by default it follows ``address``.  ``rng``
    draws the transaction ids (required, as for every core: a seeded run
    is reproducible)."""

    def __init__(self, address: Address, *, rng: random.Random, ipv6: bool | None = None,
                 retry_base: float = DEFAULT_RETRY_BASE,
                 max_retries: int = DEFAULT_MAX_RETRIES) -> None:
        if not retry_base > 0:
            raise ValueError(f"retry_base must be positive, not {retry_base!r}")
        if not 0 <= max_retries <= 30:
            raise ValueError(f"max_retries must be 0..30, not {max_retries!r}")
        if not isinstance(rng, random.Random):
            raise TypeError(f"rng must be a random.Random, not {type(rng).__name__}")
        self.address = (str(address[0]), int(address[1]))
        self._key = addr_key(self.address)  # ValueError for a host name
        self.ipv6 = self._key[0].version == 6 if ipv6 is None else ipv6
        self.retry_base = retry_base
        self.max_retries = max_retries
        self._rng = rng
        self._conn_id: bytes | None = None
        self._conn_expires = 0.0
        self._connect: _Request | None = None
        self._requests: dict[int, _Request] = {}
        self._by_tid: dict[int, _Request] = {}
        self._out: list[bytes] = []
        self._events: list[Event] = []
        self._next_id = 1
        self.counters = {"sent": 0, "received": 0, "dropped": 0, "connects": 0, "retransmits": 0}

    # ---- user calls ---------------------------------------------------------

    def announce(self, info_hash: bytes, peer_id: bytes, port: int, *, now: float,
                 event: int = EVENT_NONE, downloaded: int = 0, left: int = 0,
                 uploaded: int = 0, key: int = 0, numwant: int = -1) -> int:
        """Queue an announce; returns its request id (its answer, failure or
        timeout comes out of :meth:`next_event` with that id)."""
        if len(info_hash) != 20 or len(peer_id) != 20:
            raise LocalProtocolError("info_hash and peer_id must be 20 bytes each")
        if not 0 <= port <= 65535:
            raise LocalProtocolError(f"port must be 0..65535, not {port}")
        if event not in AnnounceEvent.__members__.values():
            raise LocalProtocolError(f"unknown announce event {event!r}")
        try:
            body = (info_hash + peer_id
                    + struct.pack(">qqqiIIiH", downloaded, left, uploaded, event, 0,
                                  key & 0xFFFFFFFF, numwant, port))
        except struct.error as exc:
            raise LocalProtocolError(f"announce field out of range: {exc}") from None
        return self._add(ACTION_ANNOUNCE, body, now)

    def scrape(self, info_hashes: list[bytes], *, now: float) -> int:
        if not 1 <= len(info_hashes) <= MAX_SCRAPE_HASHES:
            raise LocalProtocolError(f"scrape takes 1..{MAX_SCRAPE_HASHES} hashes, "
                                     f"not {len(info_hashes)}")
        if any(len(h) != 20 for h in info_hashes):
            raise LocalProtocolError("info hashes must be 20 bytes each")
        rid = self._add(ACTION_SCRAPE, b"".join(info_hashes), now)
        self._requests[rid].hashes = len(info_hashes)
        return rid

    def cancel(self, request_id: int) -> None:
        """Forget a request; a late answer to it is dropped."""
        req = self._requests.pop(request_id, None)
        if req is not None:
            self._by_tid.pop(req.tid, None)

    # ---- output ---------------------------------------------------------------

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Remove and return the datagrams to send, each with the tracker's
        address."""
        out, self._out = self._out, []
        addr = self.address
        return [(data, addr) for data in out]

    def next_event(self) -> Event | None:
        """Remove and return the oldest event (an answer, a failure or a
        timeout of one request), or None."""
        return self._events.pop(0) if self._events else None

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` must be called next (None: nothing is
        outstanding)."""
        deadlines = [r.deadline for r in self._requests.values() if r.phase is RequestPhase.SENT]
        if self._connect is not None:
            deadlines.append(self._connect.deadline)
        found = [d for d in deadlines if d is not None]
        return min(found) if found else None

    @property
    def connection_id_valid_until(self) -> float:
        return self._conn_expires if self._conn_id is not None else 0.0

    # ---- timer ------------------------------------------------------------------

    def handle_timer(self, now: float) -> None:
        conn = self._connect
        if conn is not None and conn.deadline is not None and now >= conn.deadline:
            if conn.tries > self.max_retries:
                self._connect = None
                self._by_tid.pop(conn.tid, None)
                for req in list(self._requests.values()):
                    if req.phase is RequestPhase.WAITING:
                        self._fail_timeout(req, now, conn.total_sent, conn.first_sent)
            else:
                self.counters["retransmits"] += 1
                self._send_connect(now)
        for req in list(self._requests.values()):
            if req.phase is not RequestPhase.SENT or req.deadline is None or now < req.deadline:
                continue
            if req.tries > self.max_retries:
                self._fail_timeout(req, now, req.total_sent, req.first_sent)
                continue
            self.counters["retransmits"] += 1
            if self._conn_id is None or now >= self._conn_expires:
                # The connection id has expired while we waited: connect
                # again first (the retry count goes on).
                req.phase = RequestPhase.WAITING
                self._ensure_connect(now)
            else:
                self._send_request(req, now)

    # ---- input ----------------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Take one datagram from ``addr``.  Anything not from the tracker's
        address, garbage and answers to nothing we asked are dropped and
        counted, never trusted."""
        try:
            ours = addr_key(addr) == self._key
        except (ValueError, TypeError, IndexError):
            ours = False
        if not ours:
            self.counters["received"] += 1
            self.counters["dropped"] += 1
            return
        self._receive_untrusted(data, now)

    def receive_datagram_untrusted(self, data: bytes, now: float) -> None:
        """Deprecated: :meth:`receive_datagram` with the tracker's address
        (the spelling before the :class:`~_utpkit.contract.DatagramCore`
        contract)."""
        self._receive_untrusted(data, now)

    def _receive_untrusted(self, data: bytes, now: float) -> None:
        self.counters["received"] += 1
        if len(data) < 8:
            self.counters["dropped"] += 1
            return
        action, tid = struct.unpack_from(">II", data)
        conn = self._connect
        if conn is not None and tid == conn.tid:
            if action == ACTION_CONNECT and len(data) >= 16:
                self._by_tid.pop(tid, None)
                self._connect = None
                self._conn_id = bytes(data[8:16])
                self._conn_expires = now + CONNECTION_ID_LIFETIME
                for req in list(self._requests.values()):
                    if req.phase is RequestPhase.WAITING:
                        self._send_request(req, now)
                return
            if action == ACTION_ERROR:
                self._by_tid.pop(tid, None)
                self._connect = None
                msg = _error_text_untrusted(data[8:])
                for req in list(self._requests.values()):
                    if req.phase is RequestPhase.WAITING:
                        self._finish(req, TrackerFailure(req.request_id, msg))
                return
            self.counters["dropped"] += 1
            return
        found = self._by_tid.get(tid)
        if found is None or found.phase is not RequestPhase.SENT:
            self.counters["dropped"] += 1
            return
        req = found
        if action == ACTION_ERROR:
            self._finish(req, TrackerFailure(req.request_id, _error_text_untrusted(data[8:])))
            return
        if action != req.action:
            self.counters["dropped"] += 1
            return
        if action == ACTION_ANNOUNCE and len(data) < 20:
            # opentracker's whitelist build answers a hash not on its list
            # with just action and transaction id.
            self._finish(req, TrackerFailure(req.request_id, "empty announce answer (is the info "
                                                             "hash on the tracker's whitelist?)"))
            return
        result: Event | None
        if action == ACTION_ANNOUNCE:
            result = self._parse_announce_untrusted(req.request_id, data)
        else:
            result = self._parse_scrape_untrusted(req, data)
        if result is None:
            self.counters["dropped"] += 1
            return
        self._finish(req, result)

    # ---- internals --------------------------------------------------------------------

    def _new_tid(self) -> int:
        while True:
            tid = self._rng.getrandbits(32)
            if tid not in self._by_tid:
                return tid

    def _add(self, action: int, body: bytes, now: float) -> int:
        rid = self._next_id
        self._next_id += 1
        req = _Request(rid, action, body)
        self._requests[rid] = req
        if self._conn_id is not None and now < self._conn_expires:
            self._send_request(req, now)
        else:
            self._ensure_connect(now)
        return rid

    def _ensure_connect(self, now: float) -> None:
        if self._connect is None:
            self._connect = _Request(0, ACTION_CONNECT, b"")
            self._send_connect(now)

    def _send_connect(self, now: float) -> None:
        conn = self._connect
        assert conn is not None
        self._by_tid.pop(conn.tid, None)
        conn.tid = self._new_tid()
        self._by_tid[conn.tid] = conn
        self._out.append(struct.pack(">QII", PROTOCOL_ID, ACTION_CONNECT, conn.tid))
        self._mark_sent(conn, now)
        self.counters["connects"] += 1

    def _send_request(self, req: _Request, now: float) -> None:
        assert self._conn_id is not None
        self._by_tid.pop(req.tid, None)
        req.tid = self._new_tid()
        self._by_tid[req.tid] = req
        req.phase = RequestPhase.SENT
        self._out.append(self._conn_id + struct.pack(">II", req.action, req.tid) + req.body)
        self._mark_sent(req, now)

    def _mark_sent(self, req: _Request, now: float) -> None:
        if req.first_sent is None:
            req.first_sent = now
        req.deadline = now + self.retry_base * (2 ** req.tries)
        req.tries += 1
        req.total_sent += 1
        self.counters["sent"] += 1

    def _fail_timeout(self, req: _Request, now: float, sent: int, first: float | None) -> None:
        self._finish(req, RequestTimedOut(req.request_id, sent,
                                          now - (first if first is not None else now)))

    def _finish(self, req: _Request, event: Event) -> None:
        self._requests.pop(req.request_id, None)
        self._by_tid.pop(req.tid, None)
        self._events.append(event)

    def _parse_announce_untrusted(self, rid: int, data: bytes) -> TrackerAnnounceResult | None:
        if len(data) < 20:
            return None
        interval, leechers, seeders = struct.unpack_from(">III", data, 8)
        rest = memoryview(data)[20:]
        size = 18 if self.ipv6 else 6
        if len(rest) % size:
            return None
        peers = []
        for off in range(0, len(rest), size):
            raw = bytes(rest[off:off + size - 2])
            port = int.from_bytes(rest[off + size - 2:off + size], "big")
            ip = ipaddress.IPv6Address(raw) if size == 18 else ipaddress.IPv4Address(raw)
            if port == 0:
                continue  # unusable; some trackers pad with zeros
            peers.append((str(ip), port))
        return TrackerAnnounceResult(rid, interval, leechers, seeders, tuple(peers))

    def _parse_scrape_untrusted(self, req: _Request, data: bytes) -> ScrapeResult | None:
        rest = len(data) - 8
        if rest < 0 or rest % 12 or rest // 12 > req.hashes:
            return None
        files = tuple(struct.unpack_from(">III", data, 8 + 12 * i) for i in range(rest // 12))
        return ScrapeResult(req.request_id, files)  # type: ignore[arg-type]


def _error_text_untrusted(raw: bytes) -> str:
    text = bytes(raw[:200]).decode("utf-8", "replace")
    return "".join(c if c.isprintable() else "?" for c in text) or "(no message)"
