"""One peer connection's trio driver: a :class:`bt.peerwire.PeerWire` core
over any trio stream (a uTP :class:`utp.UTPStream` or a TCP
``trio.SocketStream``), glued to its torrent's picker, choker and storage.

Three tasks per connection, so that no side can stall another:

- the *reader* feeds received bytes to the core and handles its events
  (availability into the picker, blocks to disk, requests queued for the
  server); it never waits on the network's send side, so two peers that
  both send big pieces cannot deadlock;
- the *writer* flushes whatever the core queued (requests, haves, choke
  state) whenever it is kicked;
- the *server* answers the peer's requests in order while we unchoke it,
  reading blocks through the storage's thread pool and flushing each one
  before the next (back-pressure: a peer with 2000 requests outstanding
  does not make us buffer 32 MiB).

The torrent (:mod:`bt.torrent`) owns everything shared: the picker,
piece verification, Have broadcasts, the choker and the periodic
maintenance (request timeouts, rates, keep-alives).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from _utpkit.errors import LocalProtocolError
from _utpkit.excgroup import leaves

from .peerwire import ConnectionClosed, PeerWire, RequestsDropped
from .picker import request_queue_depth
from .storage import StorageError
from .wire import (Bitfield, Cancel, ExtensionHandshake, Have, HaveAll, HaveNone, Interested,
                   NotInterested, Piece, Reject, Request, Unchoke, WireError)


if TYPE_CHECKING:
    from .torrent import Torrent

__all__ = ["PeerConnection", "PeerClosed", "RateMeter", "CLIENT_VERSION"]

CLIENT_VERSION = "utpkit-bt 0.1"
#: Bytes per receive call: a few uTP packets' worth, or a TCP window slice.
_RECV_SIZE = 256 * 1024
#: The RTT assumed in the pipelining depth (request_queue_depth uses at
#: least its 3 s queue time anyway, which dominates on loopback and LANs).
_ASSUMED_RTT = 0.1
#: Requests answered per pass of the server before it looks for new ones.
_SERVE_BATCH = 32


_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


class PeerClosed(Exception):
    """The connection ended; ``reason`` says why (for counters and logs)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


_ENDINGS = (PeerClosed, WireError, *_STREAM_ERRORS)


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


class PeerConnection:
    """One connection to a peer, after both handshakes are known.

    ``core`` has already exchanged handshakes (the session creates it:
    outgoing, we sent ours first; incoming, we confirmed after matching the
    infohash).  :meth:`run` returns when the connection ends, with the
    torrent's bookkeeping undone; it raises nothing for the peer's faults
    (they end the connection and are counted in the torrent's counters)."""

    def __init__(self, torrent: "Torrent", stream: trio.abc.Stream, core: PeerWire,
                 addr: tuple[Any, ...], transport: str, peer_id: bytes) -> None:
        self.torrent = torrent
        self.stream = stream
        self.core = core
        self.addr = addr
        self.transport = transport         # "utp" or "tcp"
        self.peer_id = peer_id
        self.down = RateMeter()            # payload bytes (blocks) received
        self.up = RateMeter()              # payload bytes sent
        self.down_rate = 0.0
        self.up_rate = 0.0
        self.in_picker = False
        self._kick = trio.Event()
        self._serve_kick = trio.Event()
        self._send_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._closing = False
        self.close_reason = ""

    def __repr__(self) -> str:
        return f"<peer {self.addr[0]}:{self.addr[1]} {self.transport}>"

    # ---- lifecycle ---------------------------------------------------------------------

    async def run(self) -> None:
        t = self.torrent
        t.attach(self)
        try:
            self._send_first()
            async with trio.open_nursery() as nursery:
                self._scope = nursery.cancel_scope
                if self._closing:
                    nursery.cancel_scope.cancel()
                nursery.start_soon(self._writer)
                nursery.start_soon(self._server)
                await self._drain_events()      # the handshake may have brought more
                await self._reader()
        except BaseException as exc:
            # a fault of the peer or the stream ends this connection only
            for leaf in leaves(exc):
                if not isinstance(leaf, _ENDINGS):
                    raise
            self._ended(next(leaf for leaf in leaves(exc)))
        finally:
            t.detach(self)
            with trio.CancelScope(shield=True), trio.move_on_after(2):
                try:
                    await self.stream.aclose()
                except _STREAM_ERRORS:
                    pass
        self.close_reason = self.close_reason or "closed"
        t.counters[f"closed.{self.close_reason.split(':')[0]}"] += 1

    def _ended(self, exc: BaseException) -> None:
        if isinstance(exc, PeerClosed):
            self.close_reason = self.close_reason or exc.reason
        elif isinstance(exc, WireError):
            self.close_reason = self.close_reason or f"violation: {exc.reason}"
            self.torrent.counters[f"violation.{exc.reason}"] += 1
        else:
            self.close_reason = self.close_reason or f"stream: {type(exc).__name__}"

    def close(self, reason: str) -> None:
        """End the connection from outside (ban, torrent stopping)."""
        self.close_reason = self.close_reason or reason
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()

    def _send_first(self) -> None:
        """Our availability (and, if negotiated, our extension handshake)."""
        core, picker = self.core, self.torrent.picker
        n = picker.geometry.num_pieces
        have = [i for i in range(n) if picker.has_piece(i)]
        if core.fast and len(have) == n:
            core.send(HaveAll())
        elif core.fast and not have:
            core.send(HaveNone())
        elif have:
            core.send(Bitfield.from_indices(have, n))
        if core.extensions:
            core.send(ExtensionHandshake(m={}, v=CLIENT_VERSION, reqq=core.reqq,
                                         p=self.torrent.listen_port or None))
        self.kick()

    # ---- tasks -------------------------------------------------------------------------

    def kick(self) -> None:
        self._kick.set()

    async def _flush(self) -> None:
        async with self._send_lock:
            data = self.core.data_to_send()
            if data:
                await self.stream.send_all(data)

    async def _writer(self) -> None:
        while True:
            await self._kick.wait()
            self._kick = trio.Event()
            await self._flush()

    async def _reader(self) -> None:
        core = self.core
        while True:
            data = await self.stream.receive_some(_RECV_SIZE)
            core.receive_data(data, time.monotonic())
            await self._drain_events()
            if not data:
                raise PeerClosed("peer closed")

    async def _server(self) -> None:
        """Answer the peer's requests, oldest first, while it is unchoked."""
        core, t = self.core, self.torrent
        while True:
            await self._serve_kick.wait()
            self._serve_kick = trio.Event()
            while not core.am_choking:
                batch = core.incoming_requests(_SERVE_BATCH)
                if not batch:
                    break
                have = [r for r in batch if t.picker.has_piece(r.index)]
                if core.fast:
                    for r in batch:
                        if not t.picker.has_piece(r.index):
                            core.send(Reject(*r.key))
                elif len(have) < len(batch):
                    break           # requests for pieces we lack: they wait for a choke
                try:
                    blocks = await t.storage.read_many([r.key for r in have])
                except StorageError as exc:
                    t.fail(exc)
                    raise PeerClosed("storage error") from None
                for req, data in zip(have, blocks):
                    if core.am_choking or not core.is_requested(req.key):
                        continue        # choked or cancelled meanwhile
                    core.send(Piece(req.index, req.begin, data))
                    self.up.add(len(data))
                    t.up.add(len(data))
                await self._flush()         # a batch at a time: fewer, larger sends

    def unchoke_changed(self) -> None:
        """The torrent (un)choked this peer: start serving."""
        self._serve_kick.set()
        self.kick()

    # ---- events ------------------------------------------------------------------------

    async def _drain_events(self) -> None:
        """Handle every queued event; the blocks among them are written in
        one thread hop after new requests went out.  A violation or a close
        met on the way still lets the blocks before it reach the disk (the
        picker already counts them as received)."""
        core = self.core
        blocks: list[tuple[int, int, bytes | memoryview]] = []
        ending: BaseException | None = None
        try:
            while (ev := core.next_event()) is not None:
                if isinstance(ev, Piece):
                    if self._on_block(ev):
                        blocks.append((ev.index, ev.begin, ev.data))
                else:
                    self._on_event(ev)
        except (PeerClosed, WireError) as exc:
            ending = exc
        if ending is None:
            self.fill_requests()
            self.kick()
        if blocks:
            await self.torrent.write_blocks(self, blocks)
        if ending is not None:
            raise ending

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
            self._serve_kick.set()
        elif isinstance(ev, Unchoke):
            t.choker.data_received(self, time.monotonic())   # the snub clock restarts
        elif isinstance(ev, (Interested, NotInterested)):
            t.choker.update(self, peer_interested=core.peer_interested)
            t.interest_changed()
        elif isinstance(ev, ConnectionClosed):
            raise PeerClosed("peer closed")
        elif isinstance(ev, ExtensionHandshake):
            ip = ev.yourip_address
            if ip is not None:
                t.session.vote_external_address(ip, self.addr)
        # Choke, Cancel, Suggest, AllowedFast, Extended, KeepAlive: the
        # core keeps the state; nothing to add here.

    def _on_block(self, ev: Piece) -> bool:
        """A block arrived: counters, picker, end-game cancels.  True when
        it is to be written."""
        t = self.torrent
        now = time.monotonic()
        n = len(ev.data)
        self.down.add(n)
        t.down.add(n)
        t.choker.data_received(self, now)
        if t.picker.has_piece(ev.index):
            t.counters["blocks.redundant"] += 1
            t.picker.received(self, ev.key, now)
            return False
        for other in t.picker.received(self, ev.key, now):
            other.send(Cancel(*ev.key))                 # end game
        return True

    # ---- requests and interest ----------------------------------------------------------

    def send(self, msg: Any) -> None:
        """Queue a message, ignoring a connection that is already closing."""
        try:
            self.core.send(msg)
        except LocalProtocolError:
            return
        self.kick()

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
            self.torrent.choker.update(self, am_interested=want, now=time.monotonic())

    def fill_requests(self) -> None:
        """Top up our outstanding requests to the pipelining depth."""
        core, t = self.core, self.torrent
        if not self.in_picker or not core.am_interested or not t.wants_data:
            return
        if core.peer_choking and not core.allowed_fast_in:
            return
        now = time.monotonic()
        depth = request_queue_depth(self.down_rate, _ASSUMED_RTT,
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
        except WireError as exc:
            self.torrent.counters[f"violation.{exc.reason}"] += 1
            self.close(f"timeout: {exc.reason}")
            return
        self.fill_requests()
        self.kick()
