"""One torrent inside a :class:`bt.session.Session`: its storage, picker,
choker, peer connections and the once-a-second maintenance that ties them
together (request timeouts, rates, the 10 s rechoke, keep-alives).

A torrent is created by :meth:`bt.session.Session.add_torrent`, which
checks the data already on disk (resume file or hashing; state
``checking``, :meth:`Torrent.initial_check`) before returning, and runs in the session's nursery until the session closes or
:meth:`bt.session.Session.remove_torrent` removes it.

Control: :meth:`Torrent.pause` (every connection closed, no dialing, no
incoming connections accepted), :meth:`Torrent.resume` (the known peers
dialed again), :meth:`Torrent.force_recheck` (every piece hashed again off
the event loop, in state ``checking``).  The state is never assigned
directly: the flags (paused, checking, error, removed) change and
:meth:`Torrent._settle` derives the state from them, so every transition
passes through one place, which tells the session's state listeners
(:attr:`bt.session.Session.state_listeners`) -- where an events notifier
(started, paused, completed, error, stopped) hooks in.
"""

from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import trio

from _utpkit.addr import unmap_host
from _utpkit.contract import StrEnum

from .choker import ChokeDecision, Choker
from .limits import RateLimits
from .magnet import Magnet, magnet_from_metainfo
from .metainfo import Metainfo, MetainfoError, parse_info_untrusted
from .peer import PeerConnection, RateMeter
from .peerlogic import Block, expire_requests
from .picker import PiecePicker
from .storage import AsyncTorrentStorage, StorageError
from .ut_metadata import FetchOutcome, MetadataFetcher
from .wire import Choke, Geometry, Have, Unchoke

if TYPE_CHECKING:
    from .announce import Announcer, TrackerStatus
    from .session import Session

__all__ = ["Torrent", "TorrentState", "TorrentStatus", "TorrentError", "StateListener",
           "PeerTransfer", "PIECE_TIMEOUT", "MAX_PEERS", "MAX_KNOWN_PEERS", "DISCONNECT_TIMEOUT"]

#: A peer that delivers nothing for this long with requests outstanding
#: has them re-issued elsewhere (libtorrent's piece_timeout, 20 s).
PIECE_TIMEOUT = 20.0
#: Connections per torrent: keeps one torrent from taking every file
#: descriptor.
MAX_PEERS = 100
#: Peer addresses remembered for reconnecting after a pause or a recheck.
MAX_KNOWN_PEERS = 1000
#: How long pause/remove/recheck wait for the connections to end (each
#: closes its stream within 2 s; a block write or hash in a thread first
#: finishes, so nothing half-written is left).
DISCONNECT_TIMEOUT = 10.0
#: A known peer we are not connected to is dialed again after this long,
#: the pause doubling after each attempt that did not last
#: (RECONNECT_STABLE seconds) up to RECONNECT_MAX: a connection lost to a
#: lossy path or turned down once (Transmission refuses a second connection
#: from an address while the first is half-open) is tried again, and a
#: peer that is gone costs one attempt every two minutes.  libtorrent waits
#: 60 s (min_reconnect_time) and gives up after 3 failures; a small swarm
#: cannot afford either.
RECONNECT_FIRST = 5.0
RECONNECT_MAX = 120.0
RECONNECT_STABLE = 60.0
#: Dial results after which an address is never dialed again (our own
#: address; a banned IP) or not while we seed (it is a seed too).
_NEVER_AGAIN = frozenset({"self", "banned", "bad metadata"})   # (a proven ut_metadata liar)
_BOTH_SEEDS = "both seeds"


class TorrentState(StrEnum):
    """Where a torrent is.  Transitions, for an events notifier:
    ``metadata`` -> ``checking`` (a magnet link's info dictionary arrived),
    ``checking`` -> ``downloading``/``seeding`` (started), ``downloading``
    -> ``seeding`` (completed), anything -> ``paused`` (paused) and back
    (resumed), anything -> ``error``, anything -> ``removed`` (stopped)."""
    METADATA = "metadata"           # a magnet link: fetching the info dictionary (BEP 9)
    CHECKING = "checking"
    DOWNLOADING = "downloading"
    SEEDING = "seeding"
    PAUSED = "paused"
    ERROR = "error"
    REMOVED = "removed"


#: Called on every state change with (torrent, old state, new state); old
#: is None when the torrent was just added.  Runs synchronously inside the
#: transition: hand the work to a task (a memory channel) if it may block.
StateListener = Callable[["Torrent", "TorrentState | None", "TorrentState"], None]


class TorrentError(Exception):
    """The torrent stopped with an error (a storage failure); the message
    says what failed."""


@dataclass(frozen=True, slots=True)
class PeerTransfer:
    """Payload bytes exchanged with one peer (by peer id) over the torrent's
    life, ended connections included: whom the torrent traded with, which
    the live peer list forgets once two seeds disconnect."""
    peer_id: bytes
    downloaded: int
    uploaded: int


@dataclass(frozen=True, slots=True)
class TorrentStatus:
    """A snapshot for progress lines and RPC.  Rates in bytes/s, ``eta`` in
    seconds (None when unknown or finished)."""
    state: TorrentState
    progress: float
    pieces_have: int
    pieces_total: int
    bytes_have: int
    bytes_total: int
    download_rate: float
    upload_rate: float
    downloaded: int
    uploaded: int
    peers: int
    peers_utp: int
    eta: float | None
    error: str | None
    #: One entry per tracker (BEP 12 order as currently tried), empty when
    #: the torrent has none or trackers are off: see bt.announce.TrackerStatus.
    trackers: tuple["TrackerStatus", ...] = ()
    #: Fraction of the pieces hashed so far while ``checking``, else None.
    checking_progress: float | None = None
    #: The torrent's counters (violations by reason, closes, pieces
    #: passed/failed, bans...): a copy.
    counters: dict[str, int] = field(default_factory=dict)
    #: Payload bytes exchanged with each peer, by peer id, ended
    #: connections included.
    transfers: tuple[PeerTransfer, ...] = ()
    #: Fraction of the info dictionary fetched while ``metadata`` (a
    #: magnet link), else None.
    metadata_progress: float | None = None
    #: Connections that began with an MSE handshake, and those of them
    #: whose payload is RC4 (bt.encryption).
    peers_encrypted: int = 0
    peers_rc4: int = 0


class Torrent:
    """See the module docstring.  Public: :attr:`meta`, :attr:`state`,
    :meth:`status`, :meth:`add_peer`, :meth:`wait_finished`, :meth:`pause`,
    :meth:`resume`, :meth:`force_recheck`, :attr:`counters`, :attr:`peers`."""

    def __init__(self, session: "Session", meta: Metainfo | None,
                 storage: AsyncTorrentStorage | None, have: frozenset[int] = frozenset(), *,
                 gid: str = "", save_path: str = ".", checking: bool = False,
                 magnet: Magnet | None = None, paused: bool = False) -> None:
        self.session = session
        #: This torrent's own limits, under the session's (bt.limits).
        self.limits = RateLimits(parent=session.limits)
        #: The download's aria2 gid (16 hex digits), stable for its life:
        #: how events, hooks and RPC name it.
        self.gid = gid
        #: The directory the torrent's files are under.
        self.save_path = save_path
        #: The parsed torrent; None while a magnet link's metadata is fetched
        #: (:attr:`has_metadata`, :meth:`wait_metadata`).
        self.meta: Metainfo = meta          # type: ignore[assignment]
        self.magnet = magnet
        self.geometry: Geometry = None      # type: ignore[assignment]
        self.storage: AsyncTorrentStorage = None    # type: ignore[assignment]
        self.picker: PiecePicker = None     # type: ignore[assignment]
        #: ut_metadata's assembly while the metadata is missing, else None.
        self.metadata_fetcher: MetadataFetcher | None = None
        if meta is not None:
            assert storage is not None
            self.info_hash = meta.info_hash
            self._set_meta(meta, storage, have)
        else:
            if magnet is None:
                raise TorrentError("a torrent needs its metainfo or a magnet link")
            self.info_hash = magnet.info_hash
            self.metadata_fetcher = MetadataFetcher(self.info_hash)
        self.choker = Choker(random.Random(), now=time.monotonic())
        self.peers: set[PeerConnection] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.down = RateMeter()
        self.up = RateMeter()
        self._down_rate = 0.0
        self._up_rate = 0.0
        self.error: str | None = None
        # the flags the state is derived from (_settle)
        self._paused = paused
        self._checking = checking       # the initial check follows (initial_check)
        self._removed = False
        self._check_done = 0
        self.state: TorrentState | None = None
        self._changed = trio.Event()
        self._writing: dict[int, int] = {}
        self._verifying: set[int] = set()
        self._dialing: set[tuple[Any, ...]] = set()
        #: address -> (when to dial it again, the pause used)
        self._redial_at: dict[tuple[Any, ...], tuple[float, float]] = {}
        self._not_again: set[tuple[Any, ...]] = set()
        self._seed_addrs: set[tuple[Any, ...]] = set()
        self._ended: dict[bytes, tuple[int, int]] = {}     # peer id -> (down, up) of closed conns
        #: Hash failures by piece index (the pieces fetched again).
        self.hash_failures: dict[int, int] = {}
        #: Addresses to dial again after a pause or recheck: peers added by
        #: address, and incoming peers that told us their listen port.
        self.known_peers: dict[tuple[Any, ...], None] = {}
        #: Peers learned through PEX (address -> BEP 11 flags), bounded by
        #: bt.peerexchange; the ones whose dialing failed may be introduced
        #: by a relay (BEP 55): asked once each, punching at most once at a time.
        self.pex_learned: dict[tuple[str, int], int] = {}
        self.rendezvous_asked: set[tuple[str, int]] = set()
        self.punching: set[tuple[str, int]] = set()
        self._peer_send, self._peer_recv = trio.open_memory_channel[tuple[Any, ...]](math.inf)
        #: The torrent's trackers (set by the session; None: no announces).
        self.announcer: Announcer | None = None
        self._scope: trio.CancelScope | None = None
        self._nursery: trio.Nursery | None = None
        self._settle()

    def _set_meta(self, meta: Metainfo, storage: AsyncTorrentStorage,
                  have: frozenset[int]) -> None:
        self.meta = meta
        self.geometry = Geometry(meta.total_length, meta.piece_length)
        self.storage = storage
        self.picker = PiecePicker(self.geometry, random.Random(), have=have)

    # ---- metadata (magnet links) -------------------------------------------------------

    @property
    def has_metadata(self) -> bool:
        """Whether the info dictionary is known (always, unless the torrent
        came from a magnet link and ut_metadata has not delivered it yet)."""
        return self.meta is not None

    @property
    def name(self) -> str:
        """The torrent's name: the info dictionary's, else the magnet
        link's ``dn``, else the infohash in hex."""
        if self.meta is not None:
            return self.meta.name
        return (self.magnet.name if self.magnet is not None and self.magnet.name
                else self.info_hash.hex())

    @property
    def magnet_link(self) -> str:
        """The torrent's magnet link: from its metainfo (name, trackers)
        when known, else the link it was added with."""
        if self.meta is not None:
            return str(magnet_from_metainfo(self.meta))
        assert self.magnet is not None
        return str(self.magnet)

    @property
    def private(self) -> bool:
        """BEP 27: a private torrent uses its trackers only (no DHT, no
        PEX).  Unknown before the metadata: a magnet link is public until
        the info dictionary says otherwise."""
        return self.meta is not None and self.meta.private

    @property
    def info_bytes(self) -> bytes | None:
        """The raw info dictionary (what ut_metadata serves), None while
        it is being fetched."""
        return self.meta.info_bytes if self.meta is not None else None

    async def wait_metadata(self) -> None:
        """Return once the info dictionary is known and the storage open
        (at once for a .torrent); TorrentError if the torrent fails or is
        removed first."""
        while self.picker is None:
            if self.error is not None:
                raise TorrentError(self.error)
            self._ensure_not_removed("wait for")
            await self._changed.wait()

    def metadata_fetched(self, outcome: FetchOutcome) -> None:
        """From ut_metadata: the verified info dictionary, or a hash
        mismatch (the peers proven to have lied are closed)."""
        if outcome.info_bytes is None:
            self.counters["metadata.hash_failures"] += 1
            for liar in outcome.liars:
                self.counters["metadata.liars"] += 1
                peer = getattr(liar, "peer", None)
                if peer is not None:
                    peer.close("bad metadata")
            return
        if self.meta is not None or self._nursery is None:
            return
        self._nursery.start_soon(self._metadata_arrived, outcome.info_bytes)

    async def _metadata_arrived(self, info_bytes: bytes) -> None:
        """Parse the info dictionary, open and check the storage, then
        carry on as a normal download with the connections we have."""
        tiers = [[t] for t in self.magnet.trackers] if self.magnet is not None else []
        self.metadata_fetcher = None
        try:
            meta = parse_info_untrusted(info_bytes, trackers=tiers)
        except MetainfoError as exc:
            self.error = f"the torrent's metadata is unusable: {exc}"
            self._settle()
            for peer in list(self.peers):
                peer.close("torrent error")
            return
        self.counters["metadata.fetched"] += 1
        self._checking = True
        self.meta = meta
        self._settle()

        def progress(done: int, total: int) -> None:     # in the worker thread
            self._check_done = done
        try:
            self.storage = await self.session._open_storage(meta, self.save_path)
            self.geometry = Geometry(meta.total_length, meta.piece_length)
            # the picker (and with it the peers' availability) only once
            # the check is done: until then the torrent stays without one
            result = await self.storage.check(progress=progress)
        except StorageError as exc:
            self._checking = False
            self.fail(exc)
            return
        finally:
            self._wake()
        self.picker = PiecePicker(self.geometry, random.Random(), have=result.have)
        self._checking = False
        self._settle()
        for peer in list(self.peers):
            peer.metadata_arrived()
        self._wake()

    # ---- public ------------------------------------------------------------------------

    @property
    def listen_port(self) -> int:
        return self.session.port

    @property
    def wants_data(self) -> bool:
        # (never before the metadata: there is nothing to request yet)
        return self.state is TorrentState.DOWNLOADING

    @property
    def active(self) -> bool:
        """Whether the torrent takes part in the swarm now: connections
        accepted and dialed, rechokes run (downloading or seeding)."""
        return self.state in (TorrentState.DOWNLOADING, TorrentState.SEEDING,
                              TorrentState.METADATA)

    @property
    def finished(self) -> bool:
        return self.picker is not None and self.picker.complete

    @property
    def banned(self) -> set[str]:
        """IPs banned for bad data: the session's set (a ban holds for every
        torrent of the session)."""
        return self.session.banned

    def add_peer(self, addr: tuple[str, int]) -> None:
        """Connect to a peer at ``(host, port)`` (uTP first, then TCP, as the
        session allows).  One attempt now if the torrent is active (a
        failure is counted in the session); the address is remembered and
        dialed again on :meth:`resume` and after :meth:`force_recheck`."""
        a = (addr[0], int(addr[1]))
        self._remember(a)
        self._peer_send.send_nowait(a)

    def offer_peers(self, peers: Any, source: str) -> int:
        """Peers learned from ``source`` ("dht", "pex", ...): each one not
        connected, not ourselves and not banned is dialed (:meth:`add_peer`)
        and counted as ``{source}.peers``.  Returns how many were taken."""
        ours = self.listen_port
        own_ips = {"0.0.0.0", "::", "::1"}
        ep = self.session.endpoint
        if ep is not None:
            own_ips.add(str(ep.local_address[0]))
            ext = ep.external_address
            if ext is not None:
                own_ips.add(str(ext[0]))
        connected = {(str(p.addr[0]), int(p.addr[1])) for p in self.peers}
        taken = 0
        for host, port in peers:
            host, port = unmap_host(str(host)), int(port)
            if not 0 < port < 65536 or (host, port) in connected or host in self.banned:
                continue
            if port == ours and (host in own_ips or host.startswith("127.")):
                continue                    # ourselves, as the DHT or a tracker lists us
            self.counters[f"{source}.peers"] += 1
            self.add_peer((host, port))
            taken += 1
        return taken

    def set_limits(self, *, upload: float | None | object = ..., download: float | None | object = ...) -> None:
        """This torrent's own upload and/or download limit (bytes/s; None or
        0: unlimited; one not named keeps its value), under the session's
        global ones, effective at once.  SessionError for a bad value."""
        from .session import _check_rate
        if upload is not ...:
            self.limits.set(upload=_check_rate("upload", upload))          # type: ignore[arg-type]
        if download is not ...:
            self.limits.set(download=_check_rate("download", download))    # type: ignore[arg-type]

    def _remember(self, addr: tuple[Any, ...]) -> None:
        if addr not in self.known_peers and len(self.known_peers) < MAX_KNOWN_PEERS:
            self.known_peers[addr] = None

    def _bytes_have(self) -> int:
        if self.picker is None:
            return 0
        return sum(self.geometry.piece_size(i) for i in range(self.geometry.num_pieces)
                   if self.picker.has_piece(i))

    def status_counts(self) -> tuple[int, int, int]:
        """(uploaded, downloaded, left) in bytes, as a tracker announce
        reports them: ``left`` without BEP 47 pad files (zeros nobody
        sends), as libtorrent counts it; before a magnet link's metadata,
        16 KiB (unknown, but not zero: a tracker takes zero for a seed)."""
        if self.picker is None:
            return self.up.total, self.down.total, 16384
        pl = self.meta.piece_length
        left = 0
        for f in self.meta.files:
            if f.pad or not f.length:
                continue
            first, last = f.offset // pl, (f.offset + f.length - 1) // pl
            for i in range(first, last + 1):
                if not self.picker.has_piece(i):
                    left += min(f.offset + f.length, (i + 1) * pl) - max(f.offset, i * pl)
        return self.up.total, self.down.total, left

    def status(self) -> TorrentStatus:
        total = self.meta.total_length if self.picker is not None else 0
        have = self._bytes_have()
        eta: float | None = None
        if self.state is TorrentState.DOWNLOADING and self._down_rate > 0:
            eta = (total - have) / self._down_rate
        checking = None
        if self.state is TorrentState.CHECKING and self.geometry is not None:
            checking = self._check_done / max(1, self.geometry.num_pieces)
        assert self.state is not None
        fetcher = self.metadata_fetcher
        if self.picker is None:
            progress = 0.0
        else:
            progress = have / total if total else 1.0
        return TorrentStatus(
            state=self.state, progress=progress,
            pieces_have=self.picker.num_have if self.picker is not None else 0,
            pieces_total=self.geometry.num_pieces if self.geometry is not None else 0,
            bytes_have=have, bytes_total=total, download_rate=self._down_rate,
            upload_rate=self._up_rate, downloaded=self.down.total, uploaded=self.up.total,
            peers=len(self.peers), peers_utp=sum(1 for p in self.peers if p.transport == "utp"),
            eta=eta, error=self.error, checking_progress=checking, counters=dict(self.counters),
            trackers=self.announcer.status() if self.announcer is not None else (),
            transfers=self._transfers(),
            metadata_progress=fetcher.progress if fetcher is not None else None,

            peers_encrypted=sum(1 for p in self.peers if p.encrypted),
            peers_rc4=sum(1 for p in self.peers if p.encryption == "rc4"))

    def _transfers(self) -> tuple[PeerTransfer, ...]:
        totals = dict(self._ended)
        for p in self.peers:
            down, up = totals.get(p.peer_id, (0, 0))
            totals[p.peer_id] = (down + p.down.total, up + p.up.total)
        return tuple(PeerTransfer(pid, down, up) for pid, (down, up) in totals.items())

    # ---- state -------------------------------------------------------------------------

    def _settle(self) -> None:
        """Derive the state from the flags; the one place a state changes
        (and the listeners hear of it)."""
        if self._removed:
            new = TorrentState.REMOVED
        elif self.error is not None:
            new = TorrentState.ERROR
        elif self._checking:
            new = TorrentState.CHECKING
        elif self._paused:
            new = TorrentState.PAUSED
        elif self.picker is None:
            new = TorrentState.METADATA
        elif self.picker.complete:
            new = TorrentState.SEEDING
        else:
            new = TorrentState.DOWNLOADING
        old = self.state
        if new is old:
            return
        self.state = new
        self._wake()
        for listener in list(self.session.state_listeners):
            listener(self, old, new)

    async def pause(self) -> None:
        """Stop taking part in the swarm: every connection closed (and waited
        for), no dialing, incoming connections refused, the resume file
        written.  The data and the known peers stay; :meth:`resume` goes on.
        Pausing a paused torrent does nothing; pausing while checking lets
        the check finish and then stays paused."""
        self._ensure_not_removed("pause")
        self._paused = True
        self._settle()
        await self._disconnect_all("paused")
        if self.storage is None:
            return
        try:
            await self.storage.save_resume()
        except StorageError as exc:
            self.fail(exc)

    async def resume(self) -> None:
        """Take part again after :meth:`pause` (or after an error: the error
        is cleared and the next disk failure stops the torrent again): the
        known peers are dialed again."""
        self._ensure_not_removed("resume")
        self._paused = False
        self.error = None
        self._settle()
        if self.active:
            self._redial()
        await trio.lowlevel.checkpoint()

    async def initial_check(self) -> None:
        """For :meth:`bt.session.Session.add_torrent`: learn what is on disk
        (the resume file, or hashing) in state ``checking``, which the
        torrent was made in.  StorageError propagates (the session then
        drops the torrent)."""
        def progress(done: int, total: int) -> None:     # in the worker thread
            self._check_done = done
        try:
            result = await self.storage.check(progress=progress)
        except BaseException:
            self._removed = True        # never started: no download events
            raise
        else:
            self.picker = PiecePicker(self.geometry, random.Random(), have=result.have)
        finally:
            self._checking = False
            self._settle()
            self._wake()            # a stop() waiting for the check

    async def force_recheck(self) -> None:
        """Hash every piece again (off the event loop), trusting no resume
        file, in state ``checking`` with every connection closed; then go
        on (downloading, seeding, or paused if it was) with what the check
        found, dialing the known peers again.  A storage error during the
        check puts the torrent in the error state (TorrentError is not
        raised: the state and :attr:`error` say it)."""
        self._ensure_not_removed("recheck")
        if self.picker is None:
            raise TorrentError(f"torrent {self.name} has no metadata yet: nothing to check")
        if self._checking:
            raise TorrentError(f"torrent {self.name} is already being checked")
        self._checking = True
        self._check_done = 0
        self.error = None
        self._settle()
        try:
            await self._disconnect_all("recheck")

            def progress(done: int, total: int) -> None:     # in the worker thread
                self._check_done = done
            try:
                result = await self.storage.check(full=True, progress=progress)
            except StorageError as exc:
                self.error = str(exc)
                return
            self.picker = PiecePicker(self.geometry, random.Random(), have=result.have)
            self.counters["rechecks"] += 1
        finally:
            self._checking = False
            self._settle()
            self._wake()            # a stop() waiting for the check
        if self.active:
            self._redial()

    def _ensure_not_removed(self, what: str) -> None:
        if self._removed:
            raise TorrentError(f"cannot {what} torrent {self.name}: it was removed")

    def _redial(self) -> None:
        for addr in self.known_peers:
            self._peer_send.send_nowait(addr)

    async def _disconnect_all(self, reason: str) -> None:
        """Close every connection and wait until each has ended (its write
        or hash in a thread finishes first)."""
        for peer in list(self.peers):
            peer.close(reason)
        with trio.move_on_after(DISCONNECT_TIMEOUT):
            while self.peers:
                await self._changed.wait()

    async def stop(self) -> None:
        """For :meth:`bt.session.Session.remove_torrent`: state ``removed``,
        the torrent's tasks cancelled, every connection ended."""
        self._removed = True
        self._settle()
        if self._scope is not None:
            self._scope.cancel()
        await self._disconnect_all("removed")
        while self._checking:       # the storage closes next: let the hashing end
            await self._changed.wait()

    async def wait_finished(self) -> None:
        """Return once every piece is verified; TorrentError if the torrent
        stops with an error or is removed first (a pause just waits)."""
        while not self.finished:
            if self.error is not None:
                raise TorrentError(self.error)
            self._ensure_not_removed("wait for")
            await self._changed.wait()

    # ---- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """The torrent's tasks until it is removed: dial queued peers,
        maintain once a second while active."""
        async with trio.open_nursery() as nursery:
            self._scope = nursery.cancel_scope
            self._nursery = nursery
            if self._removed:
                nursery.cancel_scope.cancel()
            nursery.start_soon(self._dialer, nursery)
            if self.announcer is not None:
                nursery.start_soon(self.announcer.run)
            while True:
                if self.active:
                    self._tick(time.monotonic())
                await trio.sleep(1.0)

    async def _dialer(self, nursery: trio.Nursery) -> None:
        async for addr in self._peer_recv:
            if not self.active or addr in self._dialing or len(self.peers) >= MAX_PEERS:
                continue
            self._dialing.add(addr)
            nursery.start_soon(self._dial, addr)

    async def _dial(self, addr: tuple[Any, ...]) -> None:
        started = time.monotonic()
        try:
            outcome = await self.session.connect_peer(self, addr)
            if outcome == "unreachable":
                # BEP 55: a peer that listed it may introduce us
                from .peerexchange import try_rendezvous
                try_rendezvous(self, addr)
        finally:
            self._dialing.discard(addr)
        self._dial_ended(addr, outcome, started, time.monotonic())

    def _dial_ended(self, addr: tuple[Any, ...], outcome: str, started: float, now: float) -> None:
        """Schedule the next attempt at ``addr`` after a dial (and the
        connection it made, if any) ended with ``outcome``."""
        if outcome in _NEVER_AGAIN:
            self._not_again.add(addr)
            return
        if outcome == _BOTH_SEEDS:
            self._seed_addrs.add(addr)
        _, pause = self._redial_at.get(addr, (0.0, 0.0))
        pause = RECONNECT_FIRST if now - started >= RECONNECT_STABLE or not pause \
            else min(2 * pause, RECONNECT_MAX)
        self._redial_at[addr] = (now + pause, pause)

    def _redial_due(self, now: float) -> None:
        """Dial the known peers we are not connected to whose pause is over
        (peers that are seeds too are left alone while we seed)."""
        if len(self.peers) >= MAX_PEERS:
            return
        connected = {p.addr for p in self.peers}
        seeding = self.state is TorrentState.SEEDING
        for addr, (when, _) in list(self._redial_at.items()):
            if now < when or addr in self._dialing or addr in connected \
                    or addr in self._not_again or (seeding and addr in self._seed_addrs):
                continue
            self._peer_send.send_nowait(addr)

    def _tick(self, now: float) -> None:
        self._redial_due(now)
        self._down_rate = self.down.rate(now)
        self._up_rate = self.up.rate(now)
        if self.picker is None:
            for peer in list(self.peers):
                peer.tick(now)          # keep-alives, ut_metadata's timeouts
            return
        expire_requests(self, now, PIECE_TIMEOUT)
        for peer in list(self.peers):
            peer.tick(now)
            self.choker.update(peer, download_rate=peer.down_rate, upload_rate=peer.up_rate)
        decision = self.choker.handle_timer(now, seeding=self.state is TorrentState.SEEDING)
        if decision is not None:
            self._apply(decision)

    def _apply(self, decision: ChokeDecision) -> None:
        for peer in decision.to_choke:
            if peer in self.peers:
                peer.send(Choke())
                peer.unchoke_changed()
        for peer in decision.to_unchoke:
            if peer in self.peers:
                peer.send(Unchoke())
                peer.unchoke_changed()

    def interest_changed(self) -> None:
        """A peer became (un)interested: with an upload slot free, rechoke
        now rather than at the next 10 s tick (a new leecher should not
        wait 10 s for its first block)."""
        if self.picker is None:
            return
        interested = sum(1 for p in self.peers if p.core.peer_interested)
        unchoked = self.choker.unchoked
        if len(unchoked) < min(self.choker.slots + 1, interested) \
                or any(not p.core.peer_interested for p in unchoked if p in self.peers):
            self._apply(self.choker.rechoke(time.monotonic(),
                                            seeding=self.state is TorrentState.SEEDING))

    # ---- peers -------------------------------------------------------------------------

    def attach(self, peer: PeerConnection) -> None:
        self.peers.add(peer)
        self.choker.add_peer(peer, time.monotonic())

    def detach(self, peer: PeerConnection) -> None:
        if peer in self.peers:
            down, up = self._ended.get(peer.peer_id, (0, 0))
            self._ended[peer.peer_id] = (down + peer.down.total, up + peer.up.total)
        self.peers.discard(peer)
        self.choker.remove_peer(peer)
        if peer.in_picker:
            self.picker.remove_peer(peer)
            peer.in_picker = False
        for other in self.peers:
            other.fill_requests()       # its blocks are free again
        self._wake()                    # _disconnect_all waits for this

    def connected_to(self, peer_id: bytes) -> bool:
        return any(p.peer_id == peer_id for p in self.peers)

    def connection_to(self, peer_id: bytes) -> PeerConnection | None:
        """The open connection to the peer with ``peer_id`` (not one that is
        closing), if any."""
        return next((p for p in self.peers if p.peer_id == peer_id and not p.closing), None)

    # ---- blocks and pieces -------------------------------------------------------------

    def hold_blocks(self, blocks: list[Block]) -> list[Block]:
        """Received ``(index, begin, data)`` blocks on their way to the disk
        (a connection queues them for :meth:`write_blocks`): the redundant
        ones are dropped, the rest counted as being written, so that no
        piece is hashed, or passed by another peer's blocks, while one of
        its blocks is still queued."""
        todo = []
        for index, begin, data in blocks:
            if index in self._verifying or self.picker.has_piece(index):
                self.counters["blocks.redundant"] += 1      # an end-game duplicate
                continue
            todo.append((index, begin, data))
            self._writing[index] = self._writing.get(index, 0) + 1
        return todo

    async def write_blocks(self, sender: PeerConnection, todo: list[Block]) -> None:
        """Write blocks from :meth:`hold_blocks` in one thread hop; hash each
        piece when its last write lands (not when its last block is
        *received*: another block's write may still be queued or running)."""
        if not todo:
            return
        try:
            await self.storage.write_many(todo)
        except StorageError as exc:
            self.fail(exc)
            return
        finally:
            for index, _, _ in todo:
                self._writing[index] -= 1
                if not self._writing[index]:
                    del self._writing[index]
        for index in dict.fromkeys(index for index, _, _ in todo):
            if index in self._writing or index in self._verifying \
                    or self.picker.has_piece(index) or not self.picker.piece_complete(index):
                continue
            self._verifying.add(index)
            # Shielded: every block is written, so a connection closed now (a
            # pause, a ban) must not leave the piece received but never hashed.
            try:
                with trio.CancelScope(shield=True):
                    ok = await self.storage.verify(index)
            except StorageError as exc:
                self.fail(exc)
                return
            finally:
                self._verifying.discard(index)
            if ok:
                self._piece_passed(index)
            else:
                self._piece_failed(index)

    def _wake(self) -> None:
        self._changed.set()
        self._changed = trio.Event()

    def _piece_passed(self, index: int) -> None:
        self.picker.piece_passed(index)
        self.counters["pieces.passed"] += 1
        for peer in list(self.peers):
            peer.send(Have(index))
            peer.update_interest()
        was = self.state
        self._settle()
        if was is TorrentState.DOWNLOADING and self.state is TorrentState.SEEDING:
            for peer in list(self.peers):
                if peer.peer_is_seed():
                    peer.close("both seeds")

    def _piece_failed(self, index: int) -> None:
        """A piece failed its hash: its blocks are wanted again, and every
        IP that sent one of them gets a strike (the session bans an IP at
        its second)."""
        self.counters["pieces.failed"] += 1
        self.hash_failures[index] = self.hash_failures.get(index, 0) + 1
        for ip in sorted({str(sender.addr[0]) for sender in self.picker.piece_failed(index)}):
            self.counters["peers.strikes"] += 1
            if self.session.strike(ip):
                self.counters["peers.banned"] += 1
        for peer in list(self.peers):
            peer.fill_requests()

    def fail(self, exc: StorageError) -> None:
        """A storage error stops the torrent: error state, every peer closed.
        Pieces already verified stay recorded (the resume file)."""
        if self.error is None:
            self.error = str(exc)
            self._settle()
            for peer in list(self.peers):
                peer.close("torrent error")
