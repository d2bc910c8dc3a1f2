"""One torrent inside a :class:`bt.session.Session`: its storage, picker,
choker, peer connections and the once-a-second maintenance that ties them
together (request timeouts, rates, the 10 s rechoke, keep-alives).

A torrent is created by :meth:`bt.session.Session.add_torrent`, which
checks the data already on disk (resume file or hashing) before returning,
and runs in the session's nursery until the session closes.
"""

from __future__ import annotations

import collections
import math
import random
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import trio

from _utpkit.contract import StrEnum

from .choker import ChokeDecision, Choker
from .metainfo import Metainfo
from .peer import PeerConnection, RateMeter
from .peerlogic import Block, expire_requests
from .picker import PiecePicker
from .storage import AsyncTorrentStorage, StorageError
from .wire import Choke, Geometry, Have, Unchoke

if TYPE_CHECKING:
    from .session import Session

__all__ = ["Torrent", "TorrentState", "TorrentStatus", "TorrentError", "PeerTransfer",
           "PIECE_TIMEOUT", "MAX_PEERS", "BAN_STRIKES"]

#: A peer that delivers nothing for this long with requests outstanding
#: has them re-issued elsewhere (libtorrent's piece_timeout, 20 s).
PIECE_TIMEOUT = 20.0
#: Connections per torrent: keeps one torrent from taking every file
#: descriptor.
MAX_PEERS = 100
#: Hash failures an IP may take part in before it is banned for the session.
BAN_STRIKES = 2


class TorrentState(StrEnum):
    DOWNLOADING = "downloading"
    SEEDING = "seeding"
    ERROR = "error"


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
    transfers: tuple[PeerTransfer, ...] = ()


class Torrent:
    """See the module docstring.  Public: :attr:`meta`, :meth:`status`,
    :meth:`add_peer`, :meth:`wait_finished`, :attr:`counters`, :attr:`peers`."""

    def __init__(self, session: "Session", meta: Metainfo, storage: AsyncTorrentStorage,
                 have: frozenset[int]) -> None:
        self.session = session
        self.meta = meta
        self.info_hash = meta.info_hash
        self.geometry = Geometry(meta.total_length, meta.piece_length)
        self.storage = storage
        self.picker = PiecePicker(self.geometry, random.Random(), have=have)
        self.choker = Choker(random.Random(), now=time.monotonic())
        self.peers: set[PeerConnection] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.down = RateMeter()
        self.up = RateMeter()
        self._down_rate = 0.0
        self._up_rate = 0.0
        self.error: str | None = None
        self.state = TorrentState.SEEDING if self.picker.complete else TorrentState.DOWNLOADING
        self._changed = trio.Event()
        self._writing: dict[int, int] = {}
        self._verifying: set[int] = set()
        self._strikes: dict[str, int] = {}
        self.banned: set[str] = set()
        self._dialing: set[tuple[Any, ...]] = set()
        self._ended: dict[bytes, tuple[int, int]] = {}     # peer id -> (down, up) of closed conns
        self._peer_send, self._peer_recv = trio.open_memory_channel[tuple[Any, ...]](math.inf)

    # ---- public ------------------------------------------------------------------------

    @property
    def listen_port(self) -> int:
        return self.session.port

    @property
    def wants_data(self) -> bool:
        return self.state is TorrentState.DOWNLOADING

    @property
    def finished(self) -> bool:
        return self.picker.complete

    def add_peer(self, addr: tuple[str, int]) -> None:
        """Connect to a peer at ``(host, port)`` (uTP first, then TCP, as the
        session allows).  One attempt; a failure is counted in the session."""
        self._peer_send.send_nowait((addr[0], int(addr[1])))

    def status(self) -> TorrentStatus:
        total = self.meta.total_length
        have = sum(self.geometry.piece_size(i) for i in range(self.geometry.num_pieces)
                   if self.picker.has_piece(i))
        eta: float | None = None
        if self.state is TorrentState.DOWNLOADING and self._down_rate > 0:
            eta = (total - have) / self._down_rate
        return TorrentStatus(
            state=self.state, progress=have / total if total else 1.0,
            pieces_have=self.picker.num_have, pieces_total=self.geometry.num_pieces,
            bytes_have=have, bytes_total=total, download_rate=self._down_rate,
            upload_rate=self._up_rate, downloaded=self.down.total, uploaded=self.up.total,
            peers=len(self.peers), peers_utp=sum(1 for p in self.peers if p.transport == "utp"),
            eta=eta, error=self.error, transfers=self._transfers())

    def _transfers(self) -> tuple[PeerTransfer, ...]:
        totals = dict(self._ended)
        for p in self.peers:
            down, up = totals.get(p.peer_id, (0, 0))
            totals[p.peer_id] = (down + p.down.total, up + p.up.total)
        return tuple(PeerTransfer(pid, down, up) for pid, (down, up) in totals.items())

    async def wait_finished(self) -> None:
        """Return once every piece is verified; TorrentError if the torrent
        stops with an error first."""
        while not self.picker.complete:
            if self.error is not None:
                raise TorrentError(self.error)
            await self._changed.wait()

    # ---- running -----------------------------------------------------------------------

    async def run(self) -> None:
        """The torrent's tasks: dial queued peers, maintain once a second."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._dialer, nursery)
            while self.state is not TorrentState.ERROR:
                self._tick(time.monotonic())
                await trio.sleep(1.0)
            nursery.cancel_scope.cancel()

    async def _dialer(self, nursery: trio.Nursery) -> None:
        async for addr in self._peer_recv:
            if addr in self._dialing or len(self.peers) >= MAX_PEERS:
                continue
            self._dialing.add(addr)
            nursery.start_soon(self._dial, addr)

    async def _dial(self, addr: tuple[Any, ...]) -> None:
        try:
            await self.session.connect_peer(self, addr)
        finally:
            self._dialing.discard(addr)

    def _tick(self, now: float) -> None:
        self._down_rate = self.down.rate(now)
        self._up_rate = self.up.rate(now)
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

    def connected_to(self, peer_id: bytes) -> bool:
        return any(p.peer_id == peer_id for p in self.peers)

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
            try:
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
        if self.picker.complete and self.state is TorrentState.DOWNLOADING:
            self.state = TorrentState.SEEDING
            self._wake()
            for peer in list(self.peers):
                if peer.peer_is_seed():
                    peer.close("both seeds")

    def _piece_failed(self, index: int) -> None:
        self.counters["pieces.failed"] += 1
        for sender in self.picker.piece_failed(index):
            ip = str(sender.addr[0])
            self._strikes[ip] = self._strikes.get(ip, 0) + 1
            if self._strikes[ip] >= BAN_STRIKES and ip not in self.banned:
                self.banned.add(ip)
                self.counters["peers.banned"] += 1
                for peer in list(self.peers):
                    if str(peer.addr[0]) == ip:
                        peer.close("banned: bad data")
        for peer in list(self.peers):
            peer.fill_requests()

    def fail(self, exc: StorageError) -> None:
        """A storage error stops the torrent: error state, every peer closed.
        Pieces already verified stay recorded (the resume file)."""
        if self.error is None:
            self.error = str(exc)
            self.state = TorrentState.ERROR
            self._wake()
            for peer in list(self.peers):
                peer.close("torrent error")
