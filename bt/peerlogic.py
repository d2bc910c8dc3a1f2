"""The rules between one peer's :class:`bt.peerwire.PeerWire` core and its
torrent's shared picker and choker, with no I/O and no clock of its own.

What each event from the peer changes (its availability in the picker,
interest both ways, rejected and dropped requests, blocks and the end-game
cancels they cause), which requests go out (the pipelining depth for the
peer's rate; allowed-fast pieces while it chokes us), the once-a-second
upkeep of a connection, and the torrent's request timeouts.

Why a module of its own: the trio driver (:class:`bt.peer.PeerConnection`)
and the simulations in the tests run exactly this code.  A subclass
supplies only the clock (:meth:`PeerLogic.now`), how queued bytes leave
(:meth:`PeerLogic.kick`), what a request from the peer wakes
(:meth:`PeerLogic.requested`), how a connection is closed
(:meth:`PeerLogic.close`) and what to do with an extension handshake; the
blocks to store come back from :meth:`PeerLogic.drain_events` for the
driver to write and verify.
"""

from __future__ import annotations

import collections
from typing import Any, Protocol

from _utpkit.errors import LocalProtocolError

from .choker import Choker
from .extensions import PeerExtensions
from .peerwire import ConnectionClosed, PeerWire, RequestsDropped
from .picker import PiecePicker, request_queue_depth
from .wire import (Bitfield, Cancel, Extended, ExtensionHandshake, Have, HaveAll, HaveNone,
                   Interested, NotInterested, Piece, Reject, Request, Unchoke, WireError)

__all__ = ["PeerLogic", "SwarmSide", "PeerClosed", "RateMeter", "Block", "expire_requests",
           "ASSUMED_RTT"]

#: The RTT assumed in the pipelining depth (request_queue_depth uses at
#: least its 3 s queue time anyway, which dominates on loopback and LANs).
ASSUMED_RTT = 0.1

#: A block to store: (piece index, offset, data).
Block = tuple[int, int, "bytes | memoryview"]


class PeerClosed(Exception):
    """The connection ended; ``reason`` says why (for counters and logs)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RateMeter:
    """Bytes per second over a sliding window of a few seconds (what
    status lines and the choker want: a rate that reacts within seconds
    but does not jump with each block)."""

    def __init__(self, window: float = 5.0) -> None:
        self.window = window
        self.total = 0
        self._samples: list[tuple[float, int]] = []

    def add(self, n: int) -> None:
        self.total += n

    def rate(self, now: float) -> float:
        s = self._samples
        s.append((now, self.total))
        while len(s) > 2 and now - s[1][0] >= self.window:
            s.pop(0)
        t0, b0 = s[0]
        return (self.total - b0) / (now - t0) if now > t0 else 0.0


class SwarmSide(Protocol):
    """What the peer logic needs of its torrent."""
    picker: PiecePicker
    choker: Choker
    counters: collections.Counter[str]
    down: RateMeter

    @property
    def wants_data(self) -> bool: ...

    def interest_changed(self) -> None: ...


class PeerLogic:
    """One connection's side of the torrent's rules (module docstring).
    ``core`` has exchanged handshakes already."""

    def __init__(self, torrent: SwarmSide, core: PeerWire) -> None:
        self.torrent = torrent
        self.core = core
        self.down = RateMeter()            # payload bytes (blocks) received
        self.up = RateMeter()              # payload bytes sent
        self.down_rate = 0.0
        self.up_rate = 0.0
        self.in_picker = False
        #: The BEP 10 extension handlers of this connection (set by the
        #: driver from the session's registry; None: extensions unused).
        self.extensions: PeerExtensions | None = None

    # ---- what a driver supplies --------------------------------------------------------

    def now(self) -> float:
        """The clock every deadline and rate uses."""
        raise NotImplementedError

    def kick(self) -> None:
        """Bytes were queued in the core: get them sent."""

    def requested(self) -> None:
        """The peer asked for blocks: wake whatever serves them."""

    def close(self, reason: str) -> None:
        """End the connection (a timeout, a ban)."""
        raise NotImplementedError

    def on_extension_handshake(self, ev: ExtensionHandshake) -> None:
        """The peer's BEP 10 handshake arrived."""

    def _count_violation(self, exc: WireError) -> None:
        """A protocol violation ends the connection: count it."""
        self.torrent.counters[f"violation.{exc.reason}"] += 1

    # ---- sending -----------------------------------------------------------------------

    def send(self, msg: Any) -> None:
        """Queue a message, ignoring a connection that is already closing."""
        try:
            self.core.send(msg)
        except LocalProtocolError:
            return
        self.kick()

    def send_availability(self) -> None:
        """Our pieces: have-all / have-none with the Fast Extension, else a
        bitfield (nothing when we have nothing)."""
        core, picker = self.core, self.torrent.picker
        n = picker.geometry.num_pieces
        have = [i for i in range(n) if picker.has_piece(i)]
        if core.fast and len(have) == n:
            core.send(HaveAll())
        elif core.fast and not have:
            core.send(HaveNone())
        elif have:
            core.send(Bitfield.from_indices(have, n))

    # ---- events ------------------------------------------------------------------------

    def drain_events(self) -> tuple[list[Block], BaseException | None]:
        """Handle every queued event; top up our requests.  Returns the
        blocks to store, and the PeerClosed or WireError that ends the
        connection (None while it goes on).  The blocks received before such
        an ending are returned too: the picker already counts them as
        received, so they must reach the storage."""
        blocks: list[Block] = []
        ending: BaseException | None = None
        try:
            while (ev := self.core.next_event()) is not None:
                if isinstance(ev, Piece):
                    if self._on_block(ev):
                        blocks.append((ev.index, ev.begin, ev.data))
                else:
                    self._on_event(ev)
        except (PeerClosed, WireError) as exc:
            ending = exc
        if ending is None:
            self.flush_extensions()
            self.fill_requests()
            self.kick()
        return blocks, ending

    def flush_extensions(self) -> None:
        """Queue the messages the extension handlers produced."""
        if self.extensions is not None:
            for msg in self.extensions.outgoing():
                self.send(msg)

    def _ensure_in_picker(self, bitfield: Bitfield | None = None, have_all: bool = False) -> None:
        if self.in_picker:
            return
        self.torrent.picker.add_peer(self, bitfield, have_all=have_all)
        self.in_picker = True

    def _on_event(self, ev: Any) -> None:
        t, core = self.torrent, self.core
        if isinstance(ev, Bitfield):
            self._ensure_in_picker(ev)
            self.update_interest()
        elif isinstance(ev, HaveAll):
            self._ensure_in_picker(have_all=True)
            self.update_interest()
        elif isinstance(ev, HaveNone):
            self._ensure_in_picker()
        elif isinstance(ev, Have):
            self._ensure_in_picker()
            t.picker.have(self, ev.index)
            self.update_interest()
        elif isinstance(ev, Reject):
            t.picker.cancelled(self, ev.key)
        elif isinstance(ev, RequestsDropped):
            for r in ev.requests:
                t.picker.cancelled(self, r.key)
        elif isinstance(ev, Request):
            self.requested()
        elif isinstance(ev, Unchoke):
            t.choker.data_received(self, self.now())   # the snub clock restarts
        elif isinstance(ev, (Interested, NotInterested)):
            t.choker.update(self, peer_interested=core.peer_interested)
            t.interest_changed()
        elif isinstance(ev, ConnectionClosed):
            raise PeerClosed("peer closed")
        elif isinstance(ev, ExtensionHandshake):
            if self.extensions is not None:
                self.extensions.on_handshake(ev, self.now())
            self.on_extension_handshake(ev)
        elif isinstance(ev, Extended):
            if self.extensions is not None:
                self.extensions.on_extended(ev, self.now())
        # Choke, Cancel, Suggest, AllowedFast, KeepAlive: the
        # core keeps the state; nothing to add here.

    def _on_block(self, ev: Piece) -> bool:
        """A block arrived: counters, picker, end-game cancels.  True when
        it is to be stored."""
        t = self.torrent
        now = self.now()
        n = len(ev.data)
        self.down.add(n)
        t.down.add(n)
        t.choker.data_received(self, now)
        if t.picker.has_piece(ev.index):
            t.counters["blocks.redundant"] += 1
            t.picker.received(self, ev.key, now)
            return False
        for other in t.picker.received(self, ev.key, now):
            other.send(Cancel(*ev.key))                 # type: ignore[attr-defined]  # end game
        return True

    # ---- requests and interest ----------------------------------------------------------

    def peer_is_seed(self) -> bool:
        picker = self.torrent.picker
        return self.in_picker and all(picker.peer_has(self, i)
                                      for i in range(picker.geometry.num_pieces))

    def update_interest(self) -> None:
        if not self.in_picker:
            return
        want = self.torrent.wants_data and self.torrent.picker.interesting(self)
        if want != self.core.am_interested:
            self.send(NotInterested() if not want else Interested())
            self.torrent.choker.update(self, am_interested=want, now=self.now())

    def fill_requests(self) -> None:
        """Top up our outstanding requests to the pipelining depth."""
        core, t = self.core, self.torrent
        if not self.in_picker or not core.am_interested or not t.wants_data:
            return
        if core.peer_choking and not core.allowed_fast_in:
            return
        now = self.now()
        depth = request_queue_depth(self.down_rate, ASSUMED_RTT,
                                    snubbed=t.choker.is_snubbed(self, now),
                                    peer_reqq=core.peer_reqq)
        want = depth - core.outstanding
        if want <= 0:
            return
        allowed = core.allowed_fast_in if core.peer_choking else None
        for blk in t.picker.pick(self, want, allowed=allowed):
            core.send(Request(*blk))
            t.picker.requested(self, blk, now)
        self.kick()

    def tick(self, now: float) -> None:
        """Once a second from the torrent: rates, keep-alives, timeouts."""
        self.down_rate = self.down.rate(now)
        self.up_rate = self.up.rate(now)
        try:
            self.core.handle_timer(now)
            if self.extensions is not None:
                self.extensions.handle_timer(now)
                self.flush_extensions()
        except WireError as exc:
            self._count_violation(exc)
            self.close(f"timeout: {exc.reason}")
            return
        self.fill_requests()
        self.kick()


def expire_requests(torrent: SwarmSide, now: float, timeout: float) -> None:
    """Release the requests of every peer that delivered nothing for
    ``timeout`` seconds with requests outstanding, cancelling them with it,
    so other peers can fetch those blocks (libtorrent's piece_timeout)."""
    for peer in torrent.picker.timed_out_peers(now, timeout):
        torrent.counters["requests.peer_timed_out"] += 1
        for blk in torrent.picker.peer_timed_out(peer):
            peer.send(Cancel(*blk))                     # type: ignore[attr-defined]
