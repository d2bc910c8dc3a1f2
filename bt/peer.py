"""One peer connection's trio driver: a :class:`bt.peerwire.PeerWire` core
over any trio stream (a uTP :class:`utp.UTPStream` or a TCP
``trio.SocketStream``), glued to its torrent's picker, choker and storage.

Four tasks per connection, so that no side can stall another:

- the *reader* feeds received bytes to the core and handles its events
  (availability into the picker, blocks queued for the disk, requests
  queued for the server); it never waits on the network's send side, so
  two peers that both send big pieces cannot deadlock, nor on the disk
  unless 4 MiB are queued;
- the *disk writer* hands the queued blocks to the torrent, as many as
  gathered during the previous write in one thread hop;
- the *writer* flushes whatever the core queued (requests, haves, choke
  state) whenever it is kicked;
- the *server* answers the peer's requests in order while we unchoke it,
  reading blocks through the storage's thread pool and flushing each one
  before the next (back-pressure: a peer with 2000 requests outstanding
  does not make us buffer 32 MiB).

What an event changes and which requests go out is
:class:`bt.peerlogic.PeerLogic`, shared with the simulations in the tests;
this class adds the tasks, the stream and the clock.

The torrent (:mod:`bt.torrent`) owns everything shared: the picker,
piece verification, Have broadcasts, the choker and the periodic
maintenance (request timeouts, rates, keep-alives).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import trio

from _utpkit.excgroup import leaves

from .mse import CryptoMethod
from .peerlogic import Block, PeerClosed, PeerLogic, RateMeter
from .peerwire import ConnState, PeerWire
from .storage import StorageError
from .wire import ExtensionHandshake, Piece, Reject, WireError


if TYPE_CHECKING:
    from .torrent import Torrent

__all__ = ["PeerConnection", "PeerClosed", "RateMeter", "CLIENT_VERSION"]

CLIENT_VERSION = "utpkit-bt 0.1"
#: Bytes per receive call: a few uTP packets' worth, or a TCP window slice.
_RECV_SIZE = 256 * 1024
#: Requests answered per pass of the server before it looks for new ones.
_SERVE_BATCH = 32
#: Received bytes waiting for the disk before the reader stops reading (the
#: unread bytes then hold the sender back through the transport's window).
_DISK_QUEUE_MAX = 4 * 1024 * 1024


_STREAM_ERRORS = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)


_ENDINGS = (PeerClosed, WireError, *_STREAM_ERRORS)


class PeerConnection(PeerLogic):
    """One connection to a peer, after both handshakes are known.

    ``core`` has already exchanged handshakes (the session creates it:
    outgoing, we sent ours first; incoming, we confirmed after matching the
    infohash).  :meth:`run` returns when the connection ends, with the
    torrent's bookkeeping undone; it raises nothing for the peer's faults
    (they end the connection and are counted in the torrent's counters)."""

    def __init__(self, torrent: "Torrent", stream: trio.abc.Stream, core: PeerWire,
                 addr: tuple[Any, ...], transport: str, peer_id: bytes, *,
                 encryption: CryptoMethod = CryptoMethod.NONE) -> None:
        super().__init__(torrent, core)
        self.torrent: Torrent = torrent
        self.stream = stream
        #: The uTP or TCP stream itself (``stream`` may be RC4 over it).
        self.transport_stream: trio.abc.Stream = getattr(stream, "transport_stream", stream)
        self.addr = addr
        self.transport = transport         # "utp" or "tcp"
        #: What MSE selected: "rc4", "plaintext" (MSE handshake, payload in
        #: the clear) or "none" (a plain BitTorrent handshake).
        self.encryption = CryptoMethod(encryption)
        self.peer_id = peer_id
        self._kick = trio.Event()
        self._serve_kick = trio.Event()
        self._send_lock = trio.Lock()
        self._scope: trio.CancelScope | None = None
        self._closing = False
        # blocks received and not yet handed to the torrent's writes
        self._disk_queue: list[Block] = []
        self._disk_bytes = 0
        self._disk_kick = trio.Event()
        self._disk_room = trio.Event()
        self.close_reason = ""
        #: We dialed this peer (or punched to it): it accepts connections
        #: (PEX flag 0x10); set by the session.
        self.outgoing = False
        #: The connection is a hole-punched uTP connection (BEP 55).
        self.punched = False
        registry = getattr(torrent.session, "extensions", None)
        if registry is not None:
            self.extensions = registry.connection(self)

    def __repr__(self) -> str:
        return f"<peer {self.addr[0]}:{self.addr[1]} {self.transport}>"

    @property
    def encrypted(self) -> bool:
        """The connection began with an MSE handshake (libtorrent's
        rc4_encrypted or plaintext_encrypted; PEX's ``e`` flag)."""
        return self.encryption is not CryptoMethod.NONE

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
                nursery.start_soon(self._disk_writer)
                await self._drain_events()      # the handshake may have brought more
                await self._reader()
        except BaseException as exc:
            # A fault of the peer or the stream ends this connection only: it
            # is recorded, and never raised on -- also not next to something
            # that must go on (the session closing cancels us while the peer
            # hangs up: the Cancelled goes on, the PeerClosed stays here).
            ends = [leaf for leaf in leaves(exc) if isinstance(leaf, _ENDINGS)]
            if ends:
                # a violation is what to count, even when another task ended too
                self._ended(next((e for e in ends if isinstance(e, WireError)), ends[0]))
            if isinstance(exc, BaseExceptionGroup):
                _, rest = exc.split(_ENDINGS)
                if rest is not None:
                    raise rest from exc
            elif not ends:
                raise
        finally:
            if self.extensions is not None:
                self.extensions.close()
            # The picker counts queued blocks as received: they must be
            # stored (and their pieces verified) whatever ended the connection.
            with trio.CancelScope(shield=True):     # (_write_queued shields each write)
                await self._write_queued()
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
            self._count_violation(exc)
        else:
            self.close_reason = self.close_reason or f"stream: {type(exc).__name__}"

    def _count_violation(self, exc: WireError) -> None:
        """In the torrent's counters and the session's (all torrents)."""
        key = f"violation.{exc.reason}"
        self.torrent.counters[key] += 1
        self.torrent.session.counters[key] += 1

    @property
    def closing(self) -> bool:
        """Whether :meth:`close` was called (the tasks may still be ending)."""
        return self._closing

    def close(self, reason: str) -> None:
        """End the connection from outside (ban, torrent stopping)."""
        self.close_reason = self.close_reason or reason
        self._closing = True
        if self._scope is not None:
            self._scope.cancel()

    def _send_first(self) -> None:
        """Our availability (and, if negotiated, our extension handshake)."""
        self.send_availability()
        self._send_extension_handshake()
        self.kick()

    def _send_extension_handshake(self) -> None:
        core = self.core
        if not core.extensions:
            return
        port = self.torrent.listen_port or None
        if self.extensions is not None:
            self.send(self.extensions.handshake(v=CLIENT_VERSION, reqq=core.reqq, p=port,
                                                peer_addr=self.addr))
        else:
            self.send(ExtensionHandshake(m={}, v=CLIENT_VERSION, reqq=core.reqq, p=port))

    def metadata_arrived(self) -> None:
        """The magnet link's metadata is here: as :class:`PeerLogic`, and a
        new extension handshake (BEP 10 allows one at any time) with our
        ``metadata_size``, so a peer still fetching can fetch from us."""
        self._send_extension_handshake()
        super().metadata_arrived()

    # ---- tasks -------------------------------------------------------------------------

    def now(self) -> float:
        return time.monotonic()

    def kick(self) -> None:
        self._kick.set()

    def requested(self) -> None:
        self._serve_kick.set()

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
        core, limits = self.core, self.torrent.limits
        while True:
            # Under a download limit, read no more than the bucket's burst at
            # a time and wait for tokens before the next read: the bytes left
            # unread hold back the sender (TCP's window, uTP's receive window).
            await limits.wait_download()
            data = await self.stream.receive_some(limits.read_size(_RECV_SIZE))
            limits.downloaded(len(data))
            core.receive_data(data, time.monotonic())
            await self._drain_events()
            if not data:
                raise PeerClosed("peer closed")

    async def _server(self) -> None:
        """Answer the peer's requests, oldest first, while it is unchoked,
        each block within the session's upload limit."""
        core, t = self.core, self.torrent
        limits = t.limits
        while True:
            await self._serve_kick.wait()
            self._serve_kick = trio.Event()
            while not core.am_choking:
                if core.state is ConnState.CLOSED:
                    raise PeerClosed("peer closed")     # (the reader says so too)
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
                    if limits.upload_limited and not limits.upload_ready(len(data)):
                        await self._flush()     # what is already granted goes out first
                        await limits.take_upload(len(data))
                    if core.error is not None:
                        # the reader found a violation while we waited (disk,
                        # tokens): it ends the connection; nothing more to send
                        raise PeerClosed(f"violation: {core.error.reason}")
                    if core.state is ConnState.CLOSED:
                        # the peer closed while we read the blocks: the reader
                        # ends the connection; sending now would be our error
                        raise PeerClosed("peer closed")
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
        """Handle the queued events (new requests go out at once) and queue
        the blocks among them for the disk writer; wait while too much is
        queued."""
        blocks, ending = self.drain_events()
        blocks = self.torrent.hold_blocks(blocks)
        if blocks:
            self._disk_queue += blocks
            self._disk_bytes += sum(len(b[2]) for b in blocks)
            self._disk_kick.set()
            while self._disk_bytes > _DISK_QUEUE_MAX and ending is None:
                await self._disk_room.wait()
        if ending is not None:
            raise ending

    async def _disk_writer(self) -> None:
        """Hand the queued blocks to the torrent, all that gathered while
        the previous write ran in one thread hop: the reader never waits for
        the disk, and a busy disk means larger batches, not more hops."""
        while True:
            await self._disk_kick.wait()
            self._disk_kick = trio.Event()
            await self._write_queued()

    async def _write_queued(self) -> None:
        """Write what is queued.  Shielded: the picker counts these blocks as
        received, so a closing connection must not drop them between queue
        and disk, nor leave their piece unhashed (a write in a thread cannot
        be interrupted anyway)."""
        while self._disk_queue:
            blocks, self._disk_queue = self._disk_queue, []
            try:
                with trio.CancelScope(shield=True):
                    await self.torrent.write_blocks(self, blocks)
            finally:
                self._disk_bytes -= sum(len(b[2]) for b in blocks)
                self._disk_room.set()
                self._disk_room = trio.Event()

    def on_extension_handshake(self, ev: ExtensionHandshake) -> None:
        t = self.torrent
        ip = ev.yourip_address
        if ip is not None:
            t.session.vote_external_address(ip, self.addr)
        if ev.p:
            t._remember((self.addr[0], ev.p))      # where to dial it after a pause
