"""Trackers for torrents: a session's tracker clients and each torrent's
announcer.

:class:`TrackerClients` belongs to the session: one HTTP(S) client
(:class:`bt.httptracker.HTTPTrackerClient`, httpx) and one BEP 15 UDP
client (:func:`tracker.open_tracker_client`) on the session's own uTP
Endpoint, so the port a UDP tracker records for us is the one uTP peers
reach us on.  Both open on first use (a session without trackers takes
no Endpoint queue and opens no HTTP client).

:class:`Announcer` belongs to a torrent and follows BEP 12: the tiers are
tried in order; inside a tier the trackers are shuffled once, tried in
turn, and the first one that answers moves to the front of its tier; one
answer per round is enough (later tiers are for when a whole tier fails).
Events: ``started`` to a tracker the first time it hears from us,
``completed`` once when a download this session finishes, ``stopped`` to
every tracker that heard ``started`` when the session closes (best effort,
a few seconds), and when the torrent leaves the swarm otherwise (an
error, paused, removed: ``started`` again when it is back).  Regular announces follow the tracker's ``interval``, never
sooner than its ``min interval``; ``completed`` goes out at once (the
tracker is owed the state change, as in libtorrent).  A tracker that
failed is skipped by the regular rounds for 30 s, doubling with each
failure up to 30 min (so a dead first tier does not cost a timeout every
interval); after a round where every tracker failed, the next round waits
as long.
The peers a tracker returns are dialled (``Torrent.add_peer``), except
ourselves and peers already connected.
"""

from __future__ import annotations

import math
import random
import socket as _socket
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Sequence

import trio

from _utpkit.contract import StrEnum
from _utpkit.errors import LocalProtocolError, NetworkError, ProtocolError
from tracker import (AnnounceEvent, TrackerError, open_tracker_client, parse_tracker_url,
                     resolve_tracker)

from .httptracker import AnnounceParams, HTTPAnnounceResult, HTTPTrackerClient

if TYPE_CHECKING:
    from tracker import TrackerClient

    from .torrent import Torrent

__all__ = ["Announcer", "TrackerClients", "TrackerState", "TrackerStatus", "INTERVAL_FLOOR",
           "INTERVAL_CEILING", "RETRY_FIRST", "RETRY_MAX", "STOPPED_TIMEOUT", "NUMWANT"]

#: Never announce to a working tracker more often than this, whatever its
#: ``interval`` says (a tracker saying 0 must not make us spin).
INTERVAL_FLOOR = 30.0
#: ... nor less often than this: a tracker answering with a week-long
#: ``interval`` (or ``min interval``) must not leave the torrent without new
#: peers for a week.  Transmission and libtorrent re-announce within an hour
#: at most as well.
INTERVAL_CEILING = 3600.0
#: A failed tracker (and, after a round where all failed, the torrent)
#: waits this before the next try, doubling with each failure ...
RETRY_FIRST = 30.0
#: ... up to this.
RETRY_MAX = 1800.0
#: The seconds the ``stopped`` announces get when the session closes.
STOPPED_TIMEOUT = 3.0
#: Seconds between looks at the torrent's state (paused, error: stopped).
STATE_POLL = 1.0
#: The torrent states in which it takes part in the swarm (and announces).
_ACTIVE = ("downloading", "seeding", "metadata")
#: Peers asked for per announce (libtorrent asks for 200; 50 is BEP 3's default).
NUMWANT = 50

_ANNOUNCE_ERRORS = (TrackerError, NetworkError, OSError, TimeoutError, ProtocolError, ValueError)


class TrackerState(StrEnum):
    """Where one tracker of a torrent stands."""
    NOT_CONTACTED = "not contacted"
    ANNOUNCING = "announcing"
    WORKING = "working"
    FAILING = "failing"
    UNSUPPORTED = "unsupported"     # a scheme we do not speak (wss://, a typo)


@dataclass(frozen=True, slots=True)
class TrackerStatus:
    """One tracker of a torrent, for status lines and RPC.

    ``last_announce`` is wall-clock (``time.time()``) of the last answer or
    failure; ``next_announce_in`` the seconds until the torrent's next
    round reaches this tracker first (None: it is not the one next in
    line); ``peers_received`` counts every peer it returned; ``failures``
    the failures since its last success; ``error`` / ``warning`` the last
    failure and the last ``warning message``."""
    url: str
    tier: int
    state: TrackerState
    error: str | None
    warning: str | None
    last_announce: float | None
    next_announce_in: float | None
    interval: int | None
    min_interval: int | None
    peers_received: int
    last_peers: int
    seeders: int | None
    leechers: int | None
    announces: int
    failures: int


@dataclass(slots=True)
class _Tracker:
    url: str
    tier: int
    state: TrackerState = TrackerState.NOT_CONTACTED
    error: str | None = None
    warning: str | None = None
    last_announce: float | None = None
    interval: int | None = None
    min_interval: int | None = None
    peers_received: int = 0
    last_peers: int = 0
    seeders: int | None = None
    leechers: int | None = None
    announces: int = 0
    failures: int = 0
    started: bool = False           # it answered our "started"
    retry_at: float = -math.inf     # trio time before which a failing one is skipped
    tracker_id: bytes | None = field(default=None, repr=False)


def _scheme(url: str) -> str:
    return url.split("://", 1)[0].lower() if "://" in url else ""


def _backoff(failures: int) -> float:
    return min(RETRY_FIRST * 2 ** (failures - 1), RETRY_MAX)


class TrackerClients:
    """The session's tracker clients (see the module docstring).
    ``timeout`` bounds one announce to one tracker, so a dead tracker costs
    a tier walk at most that long."""

    def __init__(self, nursery: trio.Nursery, endpoint: Any, peer_id: bytes, *,
                 timeout: float = 15.0) -> None:
        self._nursery = nursery
        self._endpoint = endpoint
        self.peer_id = peer_id
        self.timeout = timeout
        self._http: HTTPTrackerClient | None = None
        self._udp: TrackerClient | None = None
        self._udp_lock = trio.Lock()

    async def announce(self, url: str, params: AnnounceParams) -> HTTPAnnounceResult:
        """One announce to ``url`` (http, https or udp); the answer in the
        HTTP form (a UDP answer has no ``min interval`` or tracker id)."""
        scheme = _scheme(url)
        if scheme in ("http", "https"):
            if self._http is None:
                try:
                    self._http = HTTPTrackerClient(timeout=self.timeout)
                except ImportError as exc:
                    raise NetworkError(f"tracker {url}: HTTP trackers need httpx ({exc}); "
                                       f"pip install httpx") from None
            return await self._http.announce(url, params)
        if scheme == "udp":
            return await self._announce_udp(url, params)
        raise ValueError(f"tracker {url}: unsupported scheme {scheme!r} (want http, https or udp)")

    async def _udp_client(self, url: str) -> TrackerClient:
        if self._endpoint is None:
            raise NetworkError(f"tracker {url}: UDP trackers need the session's uTP Endpoint, "
                               f"and uTP is switched off")
        async with self._udp_lock:
            if self._udp is None:
                try:
                    self._udp = await self._nursery.start(self._run_udp)
                except RuntimeError as exc:     # the Endpoint's tracker queue is taken
                    raise NetworkError(f"tracker {url}: {exc}") from None
        return self._udp

    async def _run_udp(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        # BEP 15 resends after 15 * 2^n s; a tracker that has not answered
        # within our timeout is abandoned anyway, so resend within it.
        base = min(15.0, max(0.5, self.timeout / 3))
        async with open_tracker_client(self._endpoint, retry_base=base) as client:
            client.peer_id = self.peer_id
            task_status.started(client)
            await trio.sleep_forever()

    async def _announce_udp(self, url: str, p: AnnounceParams) -> HTTPAnnounceResult:
        try:
            host, port = parse_tracker_url(url)
        except ValueError as exc:
            raise LocalProtocolError(f"tracker {url!r}: unusable URL: {exc}") from None
        client = await self._udp_client(url)
        # The Endpoint's family: IPv4 only, IPv6 only, or (bound to ::, the
        # default) dual-stack, which reaches IPv4 trackers too.
        local = str(self._endpoint.local_address[0])
        family = _socket.AF_INET if ":" not in local else \
            (0 if local == "::" else _socket.AF_INET6)
        try:
            with trio.fail_after(self.timeout):
                addr = await resolve_tracker(host, port, family)
                r = await client.announce(addr, p.info_hash, port=p.port, event=p.event,
                                          downloaded=p.downloaded, left=p.left,
                                          uploaded=p.uploaded,
                                          numwant=-1 if p.numwant is None else p.numwant,
                                          key=p.key or 0)
        except trio.TooSlowError:
            raise TimeoutError(f"tracker {url} did not answer within {self.timeout:g} s") from None
        except OSError as exc:
            if isinstance(exc, (TrackerError, TimeoutError)):
                raise
            raise NetworkError(f"tracker {url}: {exc}") from None
        return HTTPAnnounceResult(interval=r.interval, min_interval=None, peers=r.peers,
                                  complete=r.seeders, incomplete=r.leechers)

    async def aclose(self) -> None:
        """Close the HTTP client (the UDP one ends with the session's nursery)."""
        if self._http is not None:
            with trio.CancelScope(shield=True):
                await self._http.aclose()


class Announcer:
    """One torrent's trackers (see the module docstring).  Made by the
    session when it adds a torrent; :meth:`run` runs in the torrent's
    nursery; :meth:`announce_stopped` is called by the session on close."""

    def __init__(self, torrent: "Torrent", clients: TrackerClients,
                 tiers: Sequence[Sequence[str]], *, rng: random.Random | None = None) -> None:
        self._torrent = torrent
        self._clients = clients
        rng = rng if rng is not None else random.Random()
        self._tiers: list[list[_Tracker]] = []
        seen: set[str] = set()
        for tier in tiers:
            urls = [u for u in dict.fromkeys(tier) if u not in seen]
            seen.update(urls)
            if not urls:
                continue
            rng.shuffle(urls)                       # BEP 12: shuffle each tier once
            trackers = [_Tracker(u, len(self._tiers)) for u in urls]
            for t in trackers:
                if _scheme(t.url) not in ("http", "https", "udp"):
                    t.state = TrackerState.UNSUPPORTED
                    t.error = f"unsupported scheme {_scheme(t.url)!r} (want http, https or udp)"
            self._tiers.append(trackers)
        self.key = rng.getrandbits(32)
        self._next = -math.inf              # trio time of the next round
        self._failed_rounds = 0
        self._completed_pending = False
        self._wakeup = trio.Event()
        self._stopped_sent = False
        self._parked = False
        self.rounds = 0

    @property
    def trackers(self) -> list[_Tracker]:
        return [t for tier in self._tiers for t in tier]

    def status(self) -> tuple[TrackerStatus, ...]:
        try:
            now = trio.current_time()
        except RuntimeError:            # asked after trio.run ended: no schedule
            now = math.inf
        first = self._next_in_line()
        out = []
        for t in self.trackers:
            nxt = max(0.0, self._next - now) \
                if t is first and math.isfinite(self._next) and math.isfinite(now) else None
            out.append(TrackerStatus(
                url=t.url, tier=t.tier, state=t.state, error=t.error, warning=t.warning,
                last_announce=t.last_announce, next_announce_in=nxt, interval=t.interval,
                min_interval=t.min_interval, peers_received=t.peers_received,
                last_peers=t.last_peers, seeders=t.seeders, leechers=t.leechers,
                announces=t.announces, failures=t.failures))
        return tuple(out)

    def _next_in_line(self) -> _Tracker | None:
        usable = [t for t in self.trackers if t.state is not TrackerState.UNSUPPORTED]
        return next((t for t in usable if t.retry_at <= self._next), usable[0] if usable else None)

    # ---- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """Announce until cancelled: started now, then per interval, and
        completed when the download finishes."""
        if self._next_in_line() is None:
            return
        try:
            async with trio.open_nursery() as nursery:
                if not self._torrent.finished:
                    nursery.start_soon(self._watch_completion)
                while True:
                    with trio.move_on_at(min(self._next, trio.current_time() + STATE_POLL)):
                        await self._wakeup.wait()
                    self._wakeup = trio.Event()
                    if str(self._torrent.state) not in _ACTIVE:
                        await self._park()
                        continue
                    if self._parked:            # active again: announce at once
                        self._parked = False
                        self._next = -math.inf
                    if trio.current_time() >= self._next or self._completed_pending:
                        await self._round()
        finally:
            # Cancelled: the torrent was removed or stopped with an error
            # (the session's close has sent stopped already, and set the flag).
            if not self._stopped_sent:
                with trio.CancelScope(shield=True), trio.move_on_after(STOPPED_TIMEOUT):
                    await self.announce_stopped()

    async def _park(self) -> None:
        """The torrent left the swarm (an error, paused, checking): stopped
        to the trackers once, then no announces until it is active again,
        when started goes out anew."""
        if self._parked:
            return
        self._parked = True
        with trio.move_on_after(STOPPED_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for t in self.trackers:
                    if t.started:
                        nursery.start_soon(self._stop_one, t)

    async def _watch_completion(self) -> None:
        from .torrent import TorrentError
        try:
            await self._torrent.wait_finished()
        except TorrentError:
            return
        self._completed_pending = True
        self._wakeup.set()

    def _params(self, t: _Tracker, event: AnnounceEvent) -> AnnounceParams:
        tor = self._torrent
        st = tor.status_counts()
        return AnnounceParams(
            info_hash=tor.info_hash, peer_id=self._clients.peer_id, port=tor.listen_port,
            uploaded=st[0], downloaded=st[1], left=st[2], event=event,
            numwant=0 if event is AnnounceEvent.STOPPED else NUMWANT, key=self.key,
            tracker_id=t.tracker_id)

    async def _round(self) -> None:
        """Walk the tiers until one tracker answers (BEP 12)."""
        self.rounds += 1
        now = trio.current_time()
        skipped = False
        for tier in self._tiers:
            for t in list(tier):
                if t.state is TrackerState.UNSUPPORTED:
                    continue
                if t.retry_at > now:        # failed lately: its own back-off
                    skipped = True
                    continue
                if not t.started:
                    event = AnnounceEvent.STARTED
                elif self._completed_pending:
                    event = AnnounceEvent.COMPLETED
                else:
                    event = AnnounceEvent.NONE
                result = await self._announce(t, event)
                if result is None:
                    continue
                tier.remove(t)
                tier.insert(0, t)                   # BEP 12: the one that works goes first
                if event is not AnnounceEvent.NONE:
                    self._completed_pending = False
                self._failed_rounds = 0
                wait = min(max(float(result.interval), float(result.min_interval or 0), INTERVAL_FLOOR),
                           INTERVAL_CEILING)
                self._next = trio.current_time() + wait
                self._feed(result.peers)
                return
        self._failed_rounds += 1
        self._next = trio.current_time() + _backoff(self._failed_rounds)
        if skipped:         # trackers in back-off: the next round is when the first ends
            self._next = min(self._next, min(t.retry_at for t in self.trackers
                                             if t.state is not TrackerState.UNSUPPORTED))

    async def _announce(self, t: _Tracker, event: AnnounceEvent) -> HTTPAnnounceResult | None:
        t.state = TrackerState.ANNOUNCING
        try:
            result = await self._clients.announce(t.url, self._params(t, event))
        except _ANNOUNCE_ERRORS as exc:
            t.state = TrackerState.FAILING
            t.error = str(exc) or type(exc).__name__
            t.failures += 1
            t.retry_at = trio.current_time() + _backoff(t.failures)
            t.last_announce = time.time()
            self._torrent.counters["tracker.failed"] += 1
            return None
        t.state = TrackerState.WORKING
        t.error = None
        t.failures = 0
        t.retry_at = -math.inf
        t.last_announce = time.time()
        t.announces += 1
        t.interval, t.min_interval = result.interval, result.min_interval
        t.seeders, t.leechers = result.complete, result.incomplete
        t.last_peers = len(result.peers)
        t.peers_received += len(result.peers)
        if result.warning is not None:
            t.warning = result.warning
        if result.tracker_id is not None:
            t.tracker_id = result.tracker_id
        if event is AnnounceEvent.STARTED:
            t.started = True
        ext = getattr(result, "external_ip", None)
        if ext is not None:         # BEP 24: one more vote for our external address
            self._torrent.session.vote_external_address(ext, (t.url,), source="tracker")
        self._torrent.counters["tracker.announces"] += 1
        return result

    def _feed(self, peers: Sequence[tuple[str, int]]) -> None:
        tor = self._torrent
        ours = tor.listen_port
        connected = {(str(p.addr[0]), int(p.addr[1])) for p in tor.peers}
        for ip, port in peers:
            if port == ours and (ip.startswith("127.") or ip in ("::1", "0.0.0.0", "::")
                                 or ip == self._own_ip()):
                continue                            # ourselves: trackers list the announcer
            if (ip, port) in connected or not port:
                continue
            tor.counters["tracker.peers_dialled"] += 1
            tor.add_peer((ip, port))

    def _own_ip(self) -> str | None:
        ep = getattr(self._torrent.session, "endpoint", None)
        return str(ep.local_address[0]) if ep is not None else None

    async def announce_stopped(self) -> None:
        """``stopped`` to every tracker that heard ``started`` from us, in
        parallel; the caller bounds the time (best effort).  Once only."""
        self._stopped_sent = True
        if self._parked:
            return                      # said already when it left the swarm
        async with trio.open_nursery() as nursery:
            for t in self.trackers:
                if t.started:
                    nursery.start_soon(self._stop_one, t)

    async def _stop_one(self, t: _Tracker) -> None:
        if await self._announce(t, AnnounceEvent.STOPPED) is not None:
            t.started = False
