"""The BitTorrent session: one per process, owning the uTP Endpoint, the TCP
listener on the same port number, the peer id and every torrent.

    async with bt.open_session(download_dir="dl", port=6881) as session:
        torrent = await session.add_torrent("x.torrent")
        torrent.add_peer(("127.0.0.1", 51413))
        await torrent.wait_finished()

Incoming connections (uTP and TCP) are matched to torrents by the infohash
of their handshake; outgoing ones try uTP first and fall back to TCP (as
libtorrent does), each transport switchable off.  Per the session's
encryption policy (:mod:`bt.encryption`) a connection begins with a
message stream encryption handshake, which the accepting side tells from
a plain one by its first bytes.  Connections to ourselves
(our own peer id comes back), second connections to a peer already
connected, connections for a torrent that is paused or checking, and any
connection from or to an IP banned for bad data (two strikes: pieces that
failed their hash with its blocks in them) are closed and counted.

Control: :meth:`Session.remove_torrent`, :meth:`Session.set_limits` (the
global upload and download limits, :mod:`bt.limits`), and per torrent
pause/resume/force_recheck (:mod:`bt.torrent`).
"""

from __future__ import annotations

import collections
import contextlib
import os
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import trio

from _utpkit.addr import unmap_host
from _utpkit.excgroup import unwrapped

from .announce import STOPPED_TIMEOUT, Announcer, TrackerClients
from .dht_torrents import SessionDHT
from .encryption import (DEFAULT_POLICY, CryptoMethod, EncryptionPolicy, MSEError, accept,
                         initiate, outgoing_attempts)
from .extensions import ExtensionRegistry
from .events import EventStream, Listener, Notifier
from .limits import RateLimits
from .magnet import Magnet, parse_magnet
from .metainfo import Metainfo, load_metainfo, parse_metainfo_untrusted
from .peer import PeerConnection
from .peerwire import HANDSHAKE_TIMEOUT, ConnectionClosed, PeerWire
from .storage import AsyncTorrentStorage, StorageError
from .storage_file import FileStorage
from .torrent import StateListener, Torrent, TorrentState
from .ut_metadata import UtMetadata
from .wire import Handshake, WireError

__all__ = ["Session", "SessionStatus", "open_session", "SessionError", "PEER_ID_PREFIX",
           "BAN_STRIKES", "EncryptionPolicy", "check_gid"]

#: Azureus-style client id (BEP 20): "-UK0100-" then 12 random bytes.
PEER_ID_PREFIX = b"-UK0100-"
#: Seconds to wait for a uTP connection before falling back to TCP.  A
#: peer without uTP answers with a RESET at once; a silent one costs this.
UTP_CONNECT_TIMEOUT = 5.0
TCP_CONNECT_TIMEOUT = 10.0
#: The whole MSE handshake, as the BitTorrent one (a slow NAT path included).
MSE_TIMEOUT = HANDSHAKE_TIMEOUT
_HANDSHAKE_READ = 16 * 1024
#: Hash failures an IP may take part in before it is banned for the
#: session: two forgives one unlucky failure (a block damaged on a path
#: whose checksums missed it, or a piece shared with the real culprit).
BAN_STRIKES = 2
_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class SessionError(Exception):
    """The session could not do what was asked (bind, add a torrent)."""


_GID = re.compile(r"[0-9a-f]{16}")


def check_gid(gid: str) -> str:
    """``gid`` as aria2 writes it (16 lowercase hex digits; upper case is
    accepted and lowered); ValueError naming it otherwise.  aria2 refuses
    the all-zero gid, and so do we."""
    low = gid.lower() if isinstance(gid, str) else gid
    if not isinstance(low, str) or not _GID.fullmatch(low) or low == "0" * 16:
        raise ValueError(f"gid must be 16 hex digits (not all zero), as aria2's, not {gid!r}")
    return low


_UNCHANGED: Any = object()


def _check_rate(name: str, value: float | None) -> float | None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not value >= 0 or value == float("inf")):
        raise SessionError(f"{name} limit must be a number of bytes/s >= 0 (0: unlimited), "
                           f"not {value!r}")
    return value


def _stream_peer(stream: trio.abc.Stream) -> tuple[str, int]:
    addr = getattr(stream, "peer_address", None)
    if addr is None:
        addr = stream.socket.getpeername()      # type: ignore[attr-defined]
    return (unmap_host(str(addr[0])), int(addr[1]))


async def _read_handshake(stream: trio.abc.Stream, core: PeerWire) -> Handshake:
    """Flush what the core queued and read until the peer's handshake."""
    while True:
        out = core.data_to_send()
        if out:
            await stream.send_all(out)
        ev = core.next_event()
        if isinstance(ev, Handshake):
            return ev
        if isinstance(ev, ConnectionClosed):
            raise ConnectionError("the peer closed the connection during the handshake")
        if ev is not None:
            continue
        data = await stream.receive_some(_HANDSHAKE_READ)
        core.receive_data(data, time.monotonic())


async def _aclose_quietly(stream: trio.abc.AsyncResource) -> None:
    with trio.CancelScope(shield=True), trio.move_on_after(2):
        with contextlib.suppress(*_STREAM_ERRORS):
            await stream.aclose()


@dataclass(frozen=True, slots=True)
class SessionStatus:
    """A snapshot of the session: its rates summed over the torrents
    (bytes/s), the limits (None: unlimited), the banned IPs and a copy of
    the session's counters (connections, refusals, handshake failures)."""
    torrents: int
    download_rate: float
    upload_rate: float
    download_limit: float | None
    upload_limit: float | None
    banned: frozenset[str]
    counters: dict[str, int] = field(default_factory=dict)


class Session:
    """See the module docstring; made by :func:`open_session`."""

    def __init__(self, nursery: trio.Nursery, endpoint: Any, port: int, download_dir: str,
                 resume_dir: str | None, utp: bool, tcp: bool, peer_id: bytes,
                 limits: RateLimits | None = None, tracker_timeout: float = 15.0,
                 encryption: EncryptionPolicy = DEFAULT_POLICY) -> None:
        self._nursery = nursery
        self.endpoint = endpoint
        self.port = port
        self.download_dir = download_dir
        self.resume_dir = resume_dir
        self.utp = utp
        self.tcp = tcp
        self.peer_id = peer_id
        #: MSE policy for new connections (bt.encryption).
        self.encryption = EncryptionPolicy(encryption)
        self.torrents: dict[bytes, Torrent] = {}
        self.counters: collections.Counter[str] = collections.Counter()
        self.disk_limiter = trio.CapacityLimiter(4)
        #: HTTP(S) and UDP tracker clients shared by the torrents.
        self.trackers = TrackerClients(nursery, endpoint, peer_id, timeout=tracker_timeout)
        self.limits = limits if limits is not None else RateLimits()
        #: IPs banned for the session, and the hash-failure strikes so far.
        self.banned: set[str] = set()
        self.strikes: collections.Counter[str] = collections.Counter()
        #: Called on every torrent state change (see bt.torrent.StateListener).
        self.state_listeners: list[StateListener] = []
        #: The BEP 10 extensions offered on every new connection
        #: (:mod:`bt.extensions`); register more before adding torrents.
        self.extensions = ExtensionRegistry([UtMetadata()])
        #: The session's DHT node (:class:`dht.DHTNode`; None: no DHT) and
        #: its torrents' announce loops.
        self.dht: Any = None
        self.dht_torrents: SessionDHT | None = None
        #: Peer exchange (BEP 11) on public torrents' new connections
        #: (open_session's ``pex``); False: ut_pex is not offered.
        self.pex = True
        # PEX (BEP 11) and the holepunch extension (BEP 55): bt.peerexchange
        from .peerexchange import install as _install_peer_exchange
        _install_peer_exchange(self)
        #: Download events (aria2's): see bt.events.  Its listeners are added
        #: with add_listener, its iterators made by events().
        self.notifier = Notifier(self, nursery)
        self.state_listeners.append(self.notifier.state_changed)
        self._gids: dict[str, Torrent] = {}

    # ---- torrents ----------------------------------------------------------------------

    async def add_torrent(self, source: str | os.PathLike[str] | bytes | Metainfo | Magnet, *,
                          save_path: str | os.PathLike[str] | None = None,
                          trackers: Sequence[str | Sequence[str]] = (),
                          use_trackers: bool = True, gid: str | None = None,
                          paused: bool = False) -> Torrent:
        """Add a torrent (a .torrent path, its bytes, or a parsed Metainfo),
        check what is already on disk under ``save_path`` (default: the
        session's download_dir), and start it, announcing to its trackers
        (BEP 12 tiers; ``trackers`` adds tiers after the torrent's own, a
        plain URL being a tier of its own; ``use_trackers=False``: none).

        A magnet link (a ``"magnet:?..."`` string or a :class:`bt.magnet.Magnet`)
        gives a torrent in state ``metadata`` (``has_metadata`` False)
        that dials the link's ``x.pe`` peers, announces to its ``tr``
        trackers and looks the infohash up in the DHT, fetches the info
        dictionary with ut_metadata (BEP 9), then opens and checks its
        storage and goes on as any download (:meth:`Torrent.wait_metadata`).

        MetainfoError for a bad torrent, MagnetError for a bad link,
        StorageError for unusable paths, SessionError if it is already in
        the session.

        ``gid``: the download's aria2 gid (16 hex digits) -- to restore a
        download under the gid it had (a daemon's session file); ValueError
        if malformed or held by another torrent of the session.  Default: a
        new random one (:attr:`Torrent.gid`).

        ``paused``: add it paused (no connections, no announces, no start
        event) until :meth:`Torrent.resume` -- a queue's waiting download."""
        gid = self._new_gid() if gid is None else check_gid(gid)
        self._check_gid_free(gid)
        where = os.fspath(save_path) if save_path is not None else self.download_dir
        extra = [trackers] if isinstance(trackers, str) else trackers    # one URL given bare
        extra_tiers = [[t] if isinstance(t, str) else list(t) for t in extra]
        if isinstance(source, str) and source[:8].lower() == "magnet:?":
            source = parse_magnet(source)
        if isinstance(source, Magnet):
            return self._add_magnet(source, where, extra_tiers, use_trackers, gid, paused)
        if isinstance(source, Metainfo):
            meta = source
        elif isinstance(source, (bytes, bytearray)):
            meta = parse_metainfo_untrusted(bytes(source))
        else:
            meta = await trio.to_thread.run_sync(load_metainfo, source)
        if meta.info_hash in self.torrents:
            raise SessionError(f"torrent {meta.info_hash.hex()} is already in the session")
        storage = await self._open_storage(meta, where)
        if meta.info_hash in self.torrents:             # added while we opened it
            await storage.aclose()
            raise SessionError(f"torrent {meta.info_hash.hex()} is already in the session")
        try:
            self._check_gid_free(gid)
        except ValueError:
            await storage.aclose()
            raise
        # in the session while it checks (state "checking", incoming
        # connections refused), so that its gid and status can be asked for
        torrent = Torrent(self, meta, storage, frozenset(), gid=gid, save_path=where,
                          checking=True, paused=paused)
        self.torrents[meta.info_hash] = torrent
        self._gids[gid] = torrent
        try:
            await torrent.initial_check()
        except BaseException:
            if self.torrents.get(meta.info_hash) is torrent:
                del self.torrents[meta.info_hash]
                self._gids.pop(gid, None)
            with trio.CancelScope(shield=True), contextlib.suppress(StorageError):
                await storage.aclose()
            raise
        if torrent.state is TorrentState.REMOVED:       # removed while it checked
            return torrent
        tiers = [*meta.trackers, *extra_tiers]
        if use_trackers and tiers:
            torrent.announcer = Announcer(torrent, self.trackers, tiers)
        return self._start(torrent)

    def _check_gid_free(self, gid: str) -> None:
        if gid in self._gids:
            raise ValueError(f"gid {gid} is already used by torrent "
                             f"{self._gids[gid].name!r} in this session")

    def _add_magnet(self, magnet: Magnet, where: str, extra_tiers: list[list[str]],
                    use_trackers: bool, gid: str, paused: bool = False) -> Torrent:
        if magnet.info_hash in self.torrents:
            raise SessionError(f"torrent {magnet.info_hash.hex()} is already in the session")
        torrent = Torrent(self, None, None, magnet=magnet, gid=gid, save_path=where,
                          paused=paused)
        self.torrents[magnet.info_hash] = torrent
        self._gids[gid] = torrent
        tiers = [*([t] for t in magnet.trackers), *extra_tiers]
        if use_trackers and tiers:
            torrent.announcer = Announcer(torrent, self.trackers, tiers)
        self._start(torrent)
        for addr in magnet.peers:
            torrent.add_peer(addr)
        return torrent

    def _start(self, torrent: Torrent) -> Torrent:
        """Run a torrent in the session (its tasks, and its DHT announces)."""
        self._nursery.start_soon(torrent.run)
        if self.dht_torrents is not None:
            self.dht_torrents.add(torrent)
        return torrent

    async def _open_storage(self, meta: Metainfo, where: str | None) -> AsyncTorrentStorage:
        """Open ``meta``'s files under ``where`` (default: the download
        directory); the check of what is there is the torrent's."""
        backend = FileStorage(where if where is not None else self.download_dir,
                              resume_dir=self.resume_dir)
        raw = await trio.to_thread.run_sync(backend.open_torrent, meta)
        return AsyncTorrentStorage(raw, self.disk_limiter)

    def _new_gid(self) -> str:
        while True:
            gid = secrets.token_hex(8)      # 64 random bits: aria2's gid size
            if gid not in self._gids and gid != "0" * 16:
                return gid

    def torrent_by_gid(self, gid: str) -> Torrent | None:
        """The torrent with this gid (any case), or None."""
        return self._gids.get(gid.lower()) if isinstance(gid, str) else None

    # ---- events ------------------------------------------------------------------------

    def add_listener(self, cb: Listener, **kw: Any) -> None:
        """Call ``cb(event)`` (sync or async) on every download event:
        :meth:`bt.events.Notifier.add_listener`."""
        self.notifier.add_listener(cb, **kw)

    def remove_listener(self, cb: Listener) -> None:
        """:meth:`bt.events.Notifier.remove_listener`."""
        self.notifier.remove_listener(cb)

    def events(self, **kw: Any) -> EventStream:
        """``async for event in session.events():`` -- every download event
        from now on (:meth:`bt.events.Notifier.events`)."""
        return self.notifier.events(**kw)

    async def remove_torrent(self, torrent: Torrent, *, delete_data: bool = False) -> None:
        """Remove ``torrent`` from the session: its connections closed (and
        waited for), incoming ones for it no longer matched, its files
        closed, its resume file deleted, and with ``delete_data`` its files
        deleted too -- only the torrent's own files, each checked to lie
        inside its download directory, and the directories they leave
        empty.  StorageError if deleting fails (the torrent is removed
        anyway); SessionError if it is not in this session."""
        if self.torrents.get(torrent.info_hash) is not torrent:
            raise SessionError(f"torrent {torrent.info_hash.hex()} is not in this session")
        del self.torrents[torrent.info_hash]
        self._gids.pop(torrent.gid, None)
        await torrent.stop()
        if torrent.storage is None:
            return                              # a magnet link without metadata: no files
        with contextlib.suppress(StorageError):
            await torrent.storage.aclose()      # a resume write failing does not matter now
        await torrent.storage.delete(data=delete_data)

    # ---- limits, bans, status ------------------------------------------------------------

    def set_limits(self, *, upload: float | None = _UNCHANGED,
                   download: float | None = _UNCHANGED) -> None:
        """Set the global upload and/or download limit (bytes/s; None or 0:
        unlimited; a limit not named keeps its value), shared by every
        torrent, effective at once.  SessionError for a bad value."""
        if upload is not _UNCHANGED:
            self.limits.set(upload=_check_rate("upload", upload))
        if download is not _UNCHANGED:
            self.limits.set(download=_check_rate("download", download))

    def strike(self, ip: str) -> bool:
        """``ip`` sent a block of a piece that failed its hash.  At
        BAN_STRIKES it is banned: every connection from it closed, and no
        new one accepted or dialed while the session runs.  Returns True
        when this strike banned it."""
        self.strikes[ip] += 1
        if self.strikes[ip] < BAN_STRIKES or ip in self.banned:
            return False
        self.banned.add(ip)
        self.counters["peers.banned"] += 1
        for torrent in self.torrents.values():
            for peer in list(torrent.peers):
                if str(peer.addr[0]) == ip:
                    peer.close("banned: bad data")
        return True

    def status(self) -> SessionStatus:
        ts = [t.status() for t in self.torrents.values()]
        return SessionStatus(
            torrents=len(ts), download_rate=sum(t.download_rate for t in ts),
            upload_rate=sum(t.upload_rate for t in ts), download_limit=self.limits.download,
            upload_limit=self.limits.upload, banned=frozenset(self.banned),
            counters=dict(self.counters))

    # ---- connections -------------------------------------------------------------------

    def vote_external_address(self, ip: str, reporter: tuple[Any, ...], *,
                              source: str = "bt") -> None:
        """A peer (BEP 10 ``yourip``) or a tracker (BEP 24 ``external
        ip``) told us where it sees us: one vote in the Endpoint's tally,
        which the DHT node's ``ip`` reports join too.  The port is ours:
        BitTorrent reports carry the IP only."""
        if self.endpoint is not None:
            self.endpoint.vote_external_address((ip, self.port), reporter=reporter, source=source)

    async def connect_peer(self, torrent: Torrent, addr: tuple[str, int]) -> str:
        """Dial ``addr`` for ``torrent`` (uTP, then TCP) and run the
        connection until it ends.  Failures are counted, not raised; the
        outcome is returned: why the connection ended (its close reason),
        or why there was none ("banned", "unreachable", "self",
        "duplicate", "handshake failed", "encryption failed", ...).

        Under the ``preferred`` policy the first attempt is MSE and a failed
        one is retried with a plain handshake on a new connection of the
        same transport (``enabled``: plain first, then MSE if the peer hung
        up before its handshake), as libtorrent does; ``required`` and
        ``disabled`` make one attempt."""
        host, port = addr
        if host in self.banned:
            self.counters["refused.banned"] += 1
            return "banned"
        stream, transport = await self._dial(host, port, ("utp", "tcp"))
        outcome = "unreachable"
        for n, encrypt in enumerate(outgoing_attempts(self.encryption)):
            if n:
                # again only if the other way may work: the MSE handshake
                # failed, or the peer hung up on our plain handshake
                if outcome != ("handshake failed" if encrypt else "encryption failed"):
                    break
                self.counters["mse.retry_encrypted" if encrypt else "mse.retry_plain"] += 1
                stream, _ = await self._dial(host, port, (transport,))
            if stream is None:
                return "unreachable"
            outcome = await self.run_outgoing(stream, torrent, (host, port), transport, encrypt)
        return outcome

    async def _dial(self, host: str, port: int,
                    transports: tuple[str, ...]) -> tuple[trio.abc.Stream | None, str]:
        """The first of ``transports`` (that the session has) to connect."""
        if "utp" in transports and self.utp and self.endpoint is not None:
            try:
                return (await self.endpoint.connect((host, port), timeout=UTP_CONNECT_TIMEOUT),
                        "utp")
            except (OSError, TimeoutError):
                self.counters["connect.utp_failed"] += 1
        if "tcp" in transports and self.tcp:
            try:
                with trio.fail_after(TCP_CONNECT_TIMEOUT):
                    return await trio.open_tcp_stream(host, port), "tcp"
            except (OSError, trio.TooSlowError):
                self.counters["connect.tcp_failed"] += 1
        return None, ""

    async def run_outgoing(self, stream: trio.abc.Stream, torrent: Torrent,
                           addr: tuple[Any, ...], transport: str, encrypt: bool, *,
                           punched: bool = False) -> str:
        """One outgoing attempt on a connected ``stream``, with an MSE
        handshake first if ``encrypt``; the outcome (see
        :meth:`connect_peer`).  ``punched``: the stream is a hole-punched uTP
        connection whose SYN was ours (BEP 55; the seam bt.peerexchange
        uses)."""
        core = PeerWire(now=time.monotonic(), geometry=torrent.geometry)
        core.send(Handshake.make(torrent.info_hash, self.peer_id))
        method, initial = CryptoMethod.NONE, b""
        if encrypt:
            try:
                stream, ev = await initiate(stream, torrent.info_hash, core.data_to_send(),
                                            self.encryption, timeout=MSE_TIMEOUT)
            except (MSEError, *_STREAM_ERRORS) as exc:
                reason = exc.reason if isinstance(exc, MSEError) else type(exc).__name__
                self.counters[f"mse.failed.{reason}"] += 1
                await _aclose_quietly(stream)
                return "encryption failed"
            method, initial = ev.method, ev.payload
            self.counters[f"mse.out.{method}"] += 1
        return await self._run_connection(stream, core, addr, transport, torrent, method=method,
                                          initial=initial, punched=punched)

    def spawn(self, fn: Callable[..., Awaitable[Any]], *args: Any) -> None:
        """Run ``fn(*args)`` as a task of the session (ends with it); for
        extensions that start work of their own (BEP 55's punches)."""
        self._nursery.start_soon(fn, *args)

    async def run_incoming(self, stream: trio.abc.Stream, transport: str, *,
                           punched: bool = False) -> None:
        """Run a connection the peer opened (or, with ``punched``, a
        hole-punched one whose SYN was the peer's): handshakes, the torrent
        by infohash, then the peer's tasks."""
        try:
            addr = _stream_peer(stream)
        except OSError:
            await _aclose_quietly(stream)
            return
        if addr[0] in self.banned:
            self.counters["refused.banned"] += 1      # before reading a byte from it
            await _aclose_quietly(stream)
            return
        core = PeerWire(now=time.monotonic())
        method, skey, initial = CryptoMethod.NONE, None, b""
        if self.encryption != EncryptionPolicy.DISABLED:
            # a plain handshake or MSE: the responder core tells them apart
            try:
                stream, ev = await accept(stream, self.torrents.keys(), self.encryption,
                                          timeout=MSE_TIMEOUT)
            except (MSEError, *_STREAM_ERRORS) as exc:
                reason = exc.reason if isinstance(exc, MSEError) else type(exc).__name__
                self.counters[f"mse.failed.{reason}"] += 1
                await _aclose_quietly(stream)
                return
            method, skey, initial = ev.method, ev.info_hash, ev.payload
            if method is not CryptoMethod.NONE:
                self.counters[f"mse.in.{method}"] += 1
        await self._run_connection(stream, core, addr, transport, None, method=method,
                                   skey=skey, initial=initial, punched=punched)

    def _refuse(self, torrent: Torrent, hs: Handshake, addr: tuple[Any, ...],
                outgoing: bool) -> str | None:
        if hs.peer_id == self.peer_id:
            return "self"
        existing = torrent.connection_to(hs.peer_id)
        if existing is not None:
            # Two peers that found each other at once (both through the
            # DHT, say) dial each other: both sides keep the connection
            # that the peer with the lower id opened, so exactly one
            # survives, whatever order each side saw them in.
            winner = min(self.peer_id, hs.peer_id)
            existing_by = self.peer_id if existing.outgoing else hs.peer_id
            if existing_by == winner or (self.peer_id if outgoing else hs.peer_id) != winner:
                return "duplicate"
            existing.close("duplicate: simultaneous open")
            self.counters["handshake.simultaneous_open"] += 1
        if addr[0] in self.banned:
            return "banned"
        if not torrent.active:
            return str(torrent.state)       # paused, checking, error, removed
        return None

    async def _run_connection(self, stream: trio.abc.Stream, core: PeerWire,
                              addr: tuple[Any, ...], transport: str,
                              torrent: Torrent | None, *,
                              method: CryptoMethod = CryptoMethod.NONE,
                              skey: bytes | None = None, initial: bytes = b"",
                              punched: bool = False) -> str:
        """Handshake (both directions), the checks, then the peer's tasks;
        returns the outcome (see :meth:`connect_peer`).  ``initial``: the
        peer's bytes that came with the MSE handshake (or were read to tell
        a plain handshake from it); ``skey``: the infohash an incoming MSE
        handshake named (the peer's BitTorrent handshake must name the
        same).  ``torrent`` given: we dialed (or punched, ``punched``: a
        BEP 55 hole-punched uTP connection) and sent our handshake first."""
        started = False
        outgoing = torrent is not None
        try:
            with trio.fail_after(HANDSHAKE_TIMEOUT):
                if initial:
                    core.receive_data(initial, time.monotonic())
                hs = await _read_handshake(stream, core)
                if torrent is None:                       # incoming: pick the torrent
                    torrent = self.torrents.get(hs.infohash)
                    if torrent is None:
                        self.counters["handshake.unknown_infohash"] += 1
                        return "unknown infohash"
                    if skey is not None and skey != hs.infohash:
                        self.counters["handshake.wrong_infohash"] += 1
                        return "wrong infohash"
                    refused = self._refuse(torrent, hs, addr, outgoing)
                    if refused:
                        self.counters[f"handshake.{refused}"] += 1
                        return refused
                    core.set_geometry(torrent.geometry)
                    core.send(Handshake.make(torrent.info_hash, self.peer_id))
                elif hs.infohash != torrent.info_hash:
                    self.counters["handshake.wrong_infohash"] += 1
                    return "wrong infohash"
            refused = self._refuse(torrent, hs, addr, outgoing)
            if refused:
                self.counters[f"handshake.{refused}"] += 1
                return refused
            conn = PeerConnection(torrent, stream, core, addr, transport, hs.peer_id,
                                  encryption=method)
            conn.outgoing = outgoing
            conn.punched = punched
            self.counters[f"connections.{transport}"] += 1
            if punched:
                self.counters["connections.punched"] += 1
            started = True
            await conn.run()
            return conn.close_reason
        except (trio.TooSlowError, WireError, ConnectionError, *_STREAM_ERRORS) as exc:
            self.counters[f"handshake.failed.{type(exc).__name__}"] += 1
            return "handshake failed"
        finally:
            if not started:
                await _aclose_quietly(stream)

    async def _accept_loop(self, listener: trio.abc.Listener[Any], transport: str) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError:
                # EMFILE and friends: back off instead of spinning
                self.counters[f"accept.{transport}_failed"] += 1
                await trio.sleep(0.5)
                continue
            self._nursery.start_soon(self.run_incoming, stream, transport)

    async def announce_stopped(self) -> None:
        """``stopped`` to the trackers of every torrent, in parallel, for at
        most STOPPED_TIMEOUT seconds (best effort: we are leaving anyway)."""
        with trio.CancelScope(shield=True), trio.move_on_after(STOPPED_TIMEOUT):
            async with trio.open_nursery() as nursery:
                for torrent in self.torrents.values():
                    if torrent.announcer is not None:
                        nursery.start_soon(torrent.announcer.announce_stopped)

    async def aclose(self) -> None:
        """Close the torrents' files and write the resume files (after the
        connections have ended), and the HTTP tracker client."""
        await self.trackers.aclose()
        for torrent in self.torrents.values():
            if torrent.storage is None:
                continue
            with contextlib.suppress(StorageError):
                await torrent.storage.aclose()


async def _bind_both(stack: contextlib.AsyncExitStack, host: str | None, port: int,
                     tcp: bool) -> tuple[Any, list[trio.SocketListener]]:
    """Open a uTP Endpoint and (if ``tcp``) TCP listeners on the same port
    number; with port 0, retry with another port while TCP finds the
    Endpoint's port taken."""
    import utp as _utp
    for attempt in range(10):
        async with contextlib.AsyncExitStack() as inner:
            try:
                ep = await inner.enter_async_context(_utp.open_endpoint(host, port, linger=2.0))
            except OSError as exc:
                raise SessionError(f"cannot bind UDP port {port}: {exc}") from None
            bound = ep.local_address[1]
            listeners: list[trio.SocketListener] = []
            if tcp:
                try:
                    listeners = await trio.open_tcp_listeners(bound, host=host)
                except OSError as exc:
                    if port or attempt == 9:
                        raise SessionError(f"cannot bind TCP port {bound}: {exc}") from None
                    continue
            owned = inner.pop_all()
        stack.push_async_exit(owned)
        return ep, listeners
    raise AssertionError("unreachable")


@contextlib.asynccontextmanager
async def _open_dht(endpoint: Any, bootstrap: Sequence[tuple[str, int]],
                    state_file: str | os.PathLike[str] | None, resume_dir: str
                    ) -> AsyncIterator[Any]:
    import dht as _dht
    if state_file is None:
        try:
            os.makedirs(resume_dir, exist_ok=True)
            state_file = os.path.join(resume_dir, "dht.json")
        except OSError:
            pass        # (a read-only download directory) the node runs without a state file
    boot = []
    for b in bootstrap:
        try:
            boot.append((str(b[0]), int(b[1])))
        except (TypeError, ValueError, IndexError):
            raise SessionError(f"DHT bootstrap node must be (host, port), not {b!r}") from None
    try:
        cm = _dht.open_node(endpoint, bootstrap=boot, wait_bootstrap=False,
                            state_file=os.fspath(state_file) if state_file is not None else None)
        node = await cm.__aenter__()
    except RuntimeError as exc:         # the Endpoint's DHT datagrams have an owner
        raise SessionError(f"cannot run a DHT node on this Endpoint: {exc}") from None
    try:
        yield node
    except BaseException as exc:
        if not await cm.__aexit__(type(exc), exc, exc.__traceback__):
            raise
    else:
        await cm.__aexit__(None, None, None)


@contextlib.asynccontextmanager
async def open_session(endpoint: Any = None, *, download_dir: str | os.PathLike[str] = ".",
                       port: int = 0, utp: bool = True, tcp: bool = True,
                       host: str | None = None, resume_dir: str | os.PathLike[str] | None = None,
                       peer_id: bytes | None = None, upload_limit: float | None = None,
                       download_limit: float | None = None,
                       tracker_timeout: float = 15.0, dht: bool | None = None,
                       dht_bootstrap: Sequence[tuple[str, int]] = (),
                       dht_state_file: str | os.PathLike[str] | None = None,
                       encryption: EncryptionPolicy | str = DEFAULT_POLICY,
                       pex: bool = True) -> AsyncIterator[Session]:
    """Run a BitTorrent session for the duration of the block.

    ``endpoint``: a running :class:`utp.Endpoint` to share (its port number
    is used for TCP too); None opens one on ``host``/``port`` (0: a port
    where UDP and TCP are both free).  ``utp`` / ``tcp`` switch each
    transport off, in and out.  ``resume_dir`` keeps resume files (default
    ``DOWNLOAD_DIR/.bt-resume``).  ``tracker_timeout`` bounds one announce
    to one tracker (then the next tracker of the BEP 12 walk is tried).
    ``DOWNLOAD_DIR/.bt-resume``).  ``upload_limit`` / ``download_limit``:
    global rates in bytes/s for all torrents (None: unlimited), changeable
    later with :meth:`Session.set_limits`.  ``encryption``: the MSE policy
    (:class:`bt.encryption.EncryptionPolicy`: disabled, enabled, preferred
    -- libtorrent's default behaviour and ours -- or required).  ``pex``:
    exchange peers with peers (BEP 11, public torrents only); off, ut_pex
    is not offered (the holepunch extension still is).

    ``dht``: run a Mainline DHT node (BEP 5) on the session's Endpoint
    (the one UDP port), used by every public torrent (:mod:`bt.dht_torrents`);
    default on when the session opens its own Endpoint, off when given one
    (whose owner may run a node on it already).  ``dht_bootstrap``: the
    ``(host, port)`` nodes to start from -- none by default: nothing is
    contacted that the caller did not name.  ``dht_state_file`` keeps the
    node id and routing table across runs (default
    ``RESUME_DIR/dht.json``).

    Resource handling: the endpoint (if opened here), the listeners, every
    connection and torrent belong to the block; leaving it closes them and
    writes the resume files."""
    if not utp and not tcp:
        raise SessionError("both uTP and TCP are switched off: no way to reach a peer")
    download_dir = os.fspath(download_dir)
    rdir = os.fspath(resume_dir) if resume_dir is not None \
        else os.path.join(download_dir, ".bt-resume")
    pid = peer_id if peer_id is not None else PEER_ID_PREFIX + secrets.token_bytes(12)
    if len(pid) != 20:
        raise SessionError("peer_id must be 20 bytes")
    if not tracker_timeout > 0:
        raise SessionError(f"tracker_timeout must be > 0 seconds, not {tracker_timeout!r}")
    try:
        policy = EncryptionPolicy(encryption)
    except ValueError:
        raise SessionError(f"encryption must be one of "
                           f"{', '.join(p.value for p in EncryptionPolicy)}, "
                           f"not {encryption!r}") from None
    limits = RateLimits(_check_rate("upload", upload_limit), _check_rate("download", download_limit))
    async with unwrapped(), contextlib.AsyncExitStack() as stack:
        tcp_listeners: list[trio.SocketListener] = []
        own_endpoint = endpoint is None
        if endpoint is None and utp:
            endpoint, tcp_listeners = await _bind_both(stack, host, port, tcp)
        elif tcp:
            bind = endpoint.local_address[1] if endpoint is not None else port
            try:
                tcp_listeners = await trio.open_tcp_listeners(bind, host=host)
            except OSError as exc:
                raise SessionError(f"cannot bind TCP port {bind}: {exc}") from None
        for lst in tcp_listeners:
            stack.push_async_callback(lst.aclose)
        if endpoint is not None:
            real_port = int(endpoint.local_address[1])
        else:
            real_port = int(tcp_listeners[0].socket.getsockname()[1])
        node = None
        if dht is None:
            dht = own_endpoint
        if dht and utp and endpoint is not None:
            node = await stack.enter_async_context(
                _open_dht(endpoint, dht_bootstrap, dht_state_file, rdir))
        session: Session | None = None
        try:
            async with trio.open_nursery() as nursery:
                session = Session(nursery, endpoint if utp else None, real_port, download_dir,
                                  rdir, utp, tcp, pid, limits, tracker_timeout, policy)
                if node is not None:
                    session.dht = node
                    session.dht_torrents = SessionDHT(session, node, nursery)
                    nursery.start_soon(session.dht_torrents.follow_external_address)
                session.pex = pex
                if utp:
                    listener = endpoint.listener or endpoint.listen()
                    nursery.start_soon(session._accept_loop, listener, "utp")
                for lst in tcp_listeners:
                    nursery.start_soon(session._accept_loop, lst, "tcp")
                try:
                    yield session
                finally:
                    await session.notifier.aclose()
                    await session.announce_stopped()
                    nursery.cancel_scope.cancel()
        finally:
            # every connection task has ended (no write still in a thread):
            # now the files close and the resume files are written
            if session is not None:
                with trio.CancelScope(shield=True):
                    await session.aclose()
