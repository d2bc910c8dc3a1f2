"""uTP streams and the listener, in trio's shapes.

:class:`UTPStream` is a :class:`trio.abc.HalfCloseableStream`; its buffers are
the engine's own: bytes the engine delivers wait in the binding's receive
buffer until ``receive_some`` takes them, and the advertised receive window is
what is left of ``recv_buffer``, so a slow reader slows the sender instead of
growing memory.  ``send_all`` copies into the engine's send buffer
(``send_buffer`` bytes, the high watermark) and returns once everything is
queued; a writer blocked on a full buffer is woken when half of it is free
(the low watermark).

:class:`UTPListener` is a :class:`trio.abc.Listener` and works with
:func:`trio.serve_listeners`.
"""

from __future__ import annotations

import collections
import operator
from typing import TYPE_CHECKING, Any, Callable, Deque

import trio

from . import _utp
from ._errors import UTPError, describe
from ._utp import EventKind

if TYPE_CHECKING:  # pragma: no cover
    from ._endpoint import Endpoint

__all__ = ["UTPStream", "UTPListener"]

# Module-level names for the per-event dispatch (a global lookup and ``is``
# cost a fifth of an Enum attribute lookup).
_READABLE, _WRITABLE, _EOF, _ERROR, _DESTROYED, _CONNECT = (
    EventKind.READABLE, EventKind.WRITABLE, EventKind.EOF, EventKind.ERROR, EventKind.DESTROYED,
    EventKind.CONNECT)

DEFAULT_RECEIVE_SIZE = 256 * 1024


def _format_peer(addr: Any) -> str:
    try:
        host, port = addr[0], addr[1]
    except (TypeError, IndexError):
        return repr(addr)
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class _ConflictDetector:
    """Raises BusyResourceError when two tasks use one direction at once
    (like trio's SocketStream)."""

    def __init__(self, msg: str) -> None:
        self._msg = msg
        self._held = False

    def __enter__(self) -> None:
        if self._held:
            raise trio.BusyResourceError(self._msg)
        self._held = True

    def __exit__(self, *exc: Any) -> None:
        self._held = False


class UTPStream(trio.abc.HalfCloseableStream):
    """A reliable, ordered byte stream over uTP.

    Error handling: when the peer resets the connection or stops answering,
    ``send_all`` and ``receive_some`` raise :class:`trio.BrokenResourceError`
    with a :class:`utp.UTPError` as ``__cause__``.  Using the stream after
    ``aclose`` raises :class:`trio.ClosedResourceError`.

    Cancellation: ``send_all`` may have queued part of the data when it is
    cancelled (as with trio's own streams, the stream is then unusable for
    sending).  ``aclose`` never blocks and always closes, gracefully, like
    closing a TCP socket; :meth:`abort` resets the connection instead.
    """

    def __init__(self, endpoint: Endpoint, sock: _utp.Socket, peer: Any) -> None:
        self._ep = endpoint
        self._sock = sock
        self._peer = peer
        self._recv_lot = trio.lowlevel.ParkingLot()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._closed_lot = trio.lowlevel.ParkingLot()
        self._send_conflict = _ConflictDetector("another task is sending on this stream")
        self._recv_conflict = _ConflictDetector("another task is receiving on this stream")
        self._closed = False        # aclose() called
        self._eof_sent = False
        self._send_full = False     # a write came back short: wait for the low watermark
        self._eof_received = False
        self._error: UTPError | None = None
        self._destroyed = False
        self._final_stats: dict[str, Any] | None = None
        self.on_state_change: Callable[[str], None] | None = None
        # Events may have come before this object existed: start from the
        # socket's own state.
        self._eof_received = sock.eof
        if sock.error is not None:
            self._error = UTPError(sock.error, describe(sock.error, _format_peer(peer)))
        sock.userdata = None
        if sock.destroyed:
            self._destroyed = True
            self._final_stats = self._collect_stats()
        else:
            endpoint.register_stream(sock, self)

    # ---- events from the Endpoint --------------------------------------------------

    def _notify(self, what: str) -> None:
        cb = self.on_state_change
        if cb is not None:
            cb(what)

    def _on_event(self, kind: EventKind, arg: Any) -> None:
        if kind is _READABLE:
            self._recv_lot.unpark_all()
        elif kind is _WRITABLE:
            self._send_lot.unpark_all()
            self._notify("writable")
        elif kind is _EOF:
            self._eof_received = True
            self._recv_lot.unpark_all()
            self._notify("eof")
        elif kind is _ERROR:
            self._error = UTPError(arg, describe(arg, _format_peer(self._peer)))
            self._recv_lot.unpark_all()
            self._send_lot.unpark_all()
            self._notify(f"error: {self._error}")
        elif kind is _DESTROYED:
            self._destroyed = True
            self._final_stats = self._collect_stats()
            self._recv_lot.unpark_all()
            self._send_lot.unpark_all()
            self._closed_lot.unpark_all()
            self._notify("closed")
        elif kind is _CONNECT:
            self._notify("connected")

    def _on_endpoint_closed(self) -> None:
        if not self._destroyed:
            self._final_stats = self._collect_stats()
            if self._error is None and not self._closed:
                self._error = UTPError(_utp.UTP_ECONNRESET, "the Endpoint was closed")
        self._destroyed = True
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()
        self._closed_lot.unpark_all()

    def _close_engine_socket(self) -> None:
        if not self._destroyed:
            self._sock.close()

    # ---- trio.abc.Stream ----------------------------------------------------------------

    def _raise_if_unusable(self) -> None:
        if self._closed:
            raise trio.ClosedResourceError("the stream is closed")
        if self._error is not None:
            raise trio.BrokenResourceError(str(self._error)) from self._error
        if self._destroyed:
            raise trio.ClosedResourceError("the stream's Endpoint is closed")

    async def send_all(self, data: bytes | bytearray | memoryview) -> None:
        with self._send_conflict:
            self._raise_if_unusable()
            if self._eof_sent:
                raise trio.ClosedResourceError("send_eof() was called; the stream takes no more data")
            await trio.lowlevel.checkpoint_if_cancelled()
            view = memoryview(data).cast("B")
            ep = self._ep
            while view:
                if self._send_full:
                    await self._wait_for_room()
                ep.before_engine_call()
                n = self._sock.write(view)
                if n:
                    view = view[n:]
                    ep.after_engine_call()
                if view:
                    self._send_full = True
            await trio.lowlevel.cancel_shielded_checkpoint()

    def _send_buffer_has_room(self) -> bool:
        """The low watermark: at most half of the send buffer is queued."""
        return self._sock.info()["send_queue"] <= self._sock.get_option(_utp.UTP_SNDBUF) // 2

    def _check_send_room(self) -> None:
        """Called by the Endpoint after each engine step while a task waits
        for room: ACKs drain the send buffer without any "writable" event
        (the engine sends that one only after a short write)."""
        if self._destroyed or self._closed or self._send_buffer_has_room():
            self._send_lot.unpark_all()

    async def _wait_for_room(self, *, watch: bool = False) -> None:
        """Park until the buffer is down to the low watermark (like a kernel
        socket: once full, it takes writes again only when half is free, so
        a full stream stays blocked for small writes too).  The engine's
        "writable" event says so after a short write; with ``watch`` the
        Endpoint also checks after every engine step.  Raises when the
        stream is closed or broken meanwhile."""
        if watch:
            self._ep.watch_send_room(self)
        try:
            while not self._send_buffer_has_room():
                await self._send_lot.park()
                self._raise_if_unusable()
            self._send_full = False
        finally:
            self._ep.unwatch_send_room(self)

    async def wait_send_all_might_not_block(self) -> None:
        """Return when ``send_all`` would not block: the buffer was never
        filled, or has drained to half.  Raises ClosedResourceError if the
        stream is (or gets) closed meanwhile, BrokenResourceError if the
        connection fails."""
        with self._send_conflict:
            self._raise_if_unusable()
            await trio.lowlevel.checkpoint_if_cancelled()
            if self._send_full and not self._send_buffer_has_room():
                await self._wait_for_room(watch=True)
            else:
                self._send_full = False
                await trio.lowlevel.cancel_shielded_checkpoint()

    async def receive_some(self, max_bytes: int | None = None) -> bytes:
        if max_bytes is not None:
            max_bytes = operator.index(max_bytes)
            if max_bytes < 1:
                raise ValueError("max_bytes must be at least 1")
        with self._recv_conflict:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            while True:
                if self._closed:
                    raise trio.ClosedResourceError("the stream was closed while receiving")
                if self._sock.readable:
                    self._ep.before_engine_call()
                    data = self._sock.read(max_bytes if max_bytes is not None else DEFAULT_RECEIVE_SIZE)
                    self._ep.after_engine_call()  # reading may reopen the window: an ACK goes out
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return data
                if self._eof_received:
                    await trio.lowlevel.cancel_shielded_checkpoint()
                    return b""
                if self._error is not None:
                    raise trio.BrokenResourceError(str(self._error)) from self._error
                if self._destroyed:
                    raise trio.ClosedResourceError("the stream's Endpoint is closed")
                await self._recv_lot.park()

    async def send_eof(self) -> None:
        with self._send_conflict:
            if self._closed:
                raise trio.ClosedResourceError("the stream is closed")
            await trio.lowlevel.checkpoint_if_cancelled()
            if not self._eof_sent and self._error is None and not self._destroyed:
                self._eof_sent = True
                self._ep.before_engine_call()
                self._sock.shutdown_write()
                self._ep.after_engine_call()
            self._eof_sent = True
            await trio.lowlevel.cancel_shielded_checkpoint()

    async def aclose(self) -> None:
        """Close the stream, like closing a TCP socket: queued data and a FIN
        still go out in the background while the Endpoint runs (the Endpoint
        lingers on exit until they are acknowledged); this returns at once.
        Data the peer sends after the close is answered with a reset.  Use
        :meth:`wait_send_complete` first to know that everything arrived."""
        if not self._closed:
            self._closed = True
            self._recv_lot.unpark_all()
            self._send_lot.unpark_all()
            if not self._destroyed and not self._ep.engine_closed:
                self._ep.before_engine_call()
                self._sock.close()
                self._ep.after_engine_call()
        await trio.lowlevel.checkpoint()

    async def wait_send_complete(self, *, poll: float | None = None) -> None:
        """Wait until the peer has acknowledged every byte given to
        ``send_all``.

        Returns as soon as nothing is outstanding, even if the peer has
        closed or reset the connection since.  Raises BrokenResourceError if
        the connection fails with data still unacknowledged, and
        ClosedResourceError if the stream was closed first.  It checks after
        each round of the engine's work (an ACK can only arrive then), so
        ``poll`` is ignored (kept for callers that passed it)."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            stats = self.statistics()
            if stats["send_queue"] == 0 and stats["in_flight"] == 0:
                break
            self._raise_if_unusable()
            await self._ep.wait_engine_progress()
        await trio.lowlevel.cancel_shielded_checkpoint()

    def abort(self) -> None:
        """Reset the connection at once: queued data is discarded and the
        peer gets a reset (BrokenResourceError), not an orderly end of
        stream.  For giving up, e.g. on Ctrl-C, so the peer cannot mistake
        a truncated stream for a complete one.  The stream is closed."""
        self._closed = True
        self._recv_lot.unpark_all()
        self._send_lot.unpark_all()
        self._abort()

    def _abort(self) -> None:
        """Reset the connection (used for refused connections and for
        streams an Endpoint drops on close)."""
        if not self._destroyed and not self._ep.engine_closed:
            self._sock.abort()
            self._ep.after_engine_call()

    # ---- information ---------------------------------------------------------------------

    @property
    def peer_address(self) -> Any:
        """The peer's address, as the socket module spells it."""
        return self._peer

    @property
    def local_address(self) -> Any:
        """The Endpoint's address (all streams of an Endpoint share it)."""
        return self._ep.local_address

    @property
    def endpoint(self) -> Endpoint:
        return self._ep

    def _collect_stats(self) -> dict[str, Any]:
        st = self._sock.stats()
        info = self._sock.info()
        return {
            "bytes_sent": st["nbytes_xmit"],
            "bytes_received": st["nbytes_recv"],
            "packets_sent": st["nxmit"],
            "packets_received": st["nrecv"],
            "retransmits": st["rexmit"] + st["fastrexmit"],
            "timeout_retransmits": st["rexmit"],
            "fast_retransmits": st["fastrexmit"],
            "duplicates_received": st["nduprecv"],
            "rtt_ms": info["srtt_us"] / 1000.0,
            "rto_ms": info["rto_ms"],
            "cwnd": info["cwnd"],
            "in_flight": info["in_flight"],
            "send_queue": info["send_queue"],
            "mtu": st["mtu_guess"],
            "timeouts": info["timeouts"],
            "loss_events": info["loss_events"],
        }

    def peer_confirmed(self, *, probe: bool = False) -> bool:
        """Has the peer sent anything since the handshake?  A completed
        handshake alone does not prove the peer's address: anyone can forge a
        SYN.  With ``probe=True`` a keepalive asks the peer to answer (rate
        limited for unconfirmed peers); poll again to see the answer."""
        if self._closed:
            return False
        try:
            if probe:
                self._ep.before_engine_call()
                if self._sock.probe():
                    self._ep.after_engine_call()  # the probe goes out now, not with the next batch
            return bool(self._sock.info().get("peer_confirmed"))
        except (_utp.ClosedError, RuntimeError):
            return False

    def statistics(self) -> dict[str, Any]:
        """Bytes and packets each way, retransmissions, RTT, window, packet size.

        ``bytes_sent`` counts payload bytes put on the wire, retransmissions
        included."""
        if self._final_stats is not None:
            return dict(self._final_stats)
        return self._collect_stats()

    def __repr__(self) -> str:
        return f"<UTPStream {_format_peer(self._peer)}{' closed' if self._closed else ''}>"


class UTPListener(trio.abc.Listener[UTPStream]):
    """Accepts incoming uTP connections of one Endpoint.

    Incoming connections wait in a queue of ``backlog`` streams; past it they
    are refused (reset) and counted.  ``pause()`` stops accepting: while
    paused, the engine refuses SYNs with a RESET, so connecting peers get
    ConnectionRefusedError at once rather than waiting; ``resume()``
    undoes it.  ``firewall``, if set, is called with the peer's address for
    each new connection and refuses it (RESET) when it returns False.
    Refusals and firewall exceptions are counted in :meth:`statistics`; an
    exception raised by the firewall is passed to ``on_error`` when set, and
    otherwise re-raised from the next ``accept()``.

    The firewall runs inside the engine, before it answers the SYN: a
    refused peer gets a RESET and nothing else (no SYN-ACK, no engine
    socket, no accept event).  It runs in the middle of a received
    datagram, so it must not call the Endpoint's engine (connect, write,
    ...; RuntimeError); it may look at and change plain Python state.

    A listener from :meth:`Endpoint.claim_incoming` (``match`` set) gets
    only the connections whose peer address ``match`` accepts; the
    Endpoint's own listener gets the rest.
    """

    def __init__(self, endpoint: Endpoint, backlog: int,
                 match: Callable[[Any], bool] | None = None) -> None:
        if backlog < 1:
            raise ValueError("backlog must be at least 1")
        self._ep = endpoint
        self.match = match
        self.backlog = backlog
        self._queue: Deque[UTPStream] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._paused = False
        self._pending_error: BaseException | None = None
        self._firewall: Callable[[Any], bool] | None = None
        self.on_error: Callable[[BaseException], None] | None = None
        self.accepted = 0
        self.refused_backlog = 0
        self.refused_firewall = 0

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def firewall(self) -> Callable[[Any], bool] | None:
        """Called with the peer's address before the engine answers a SYN;
        false refuses the peer outright (see the class docs)."""
        return self._firewall

    @firewall.setter
    def firewall(self, value: Callable[[Any], bool] | None) -> None:
        if value is not None and not callable(value):
            raise TypeError(f"firewall must be callable or None, not {type(value).__name__}")
        self._firewall = value
        if not self._closed:
            self._ep.update_admission()

    @property
    def paused(self) -> bool:
        return self._paused

    @property
    def endpoint(self) -> Endpoint:
        return self._ep

    def pause(self) -> None:
        """Stop accepting: new SYNs are refused with a RESET."""
        self._paused = True
        self._ep.update_admission()

    def resume(self) -> None:
        """Accept again (undoes :meth:`pause`; nothing once closed)."""
        self._paused = False
        if not self._closed:
            self._ep.update_admission()

    def _admit(self, addr: Any) -> bool:
        """The engine's question before it answers a SYN from ``addr``
        (through Endpoint.update_admission): may it connect?"""
        if self._closed or self._paused:
            return False
        fw = self._firewall
        if fw is None:
            return True
        try:
            allowed = bool(fw(addr))
        except BaseException as exc:  # never lost: reported, and the peer refused
            self._report(exc)
            allowed = False
        if not allowed:
            self.refused_firewall += 1
        return allowed

    def _on_accept(self, sock: _utp.Socket, addr: Any) -> None:
        if len(self._queue) >= self.backlog:
            self.refused_backlog += 1
            sock.abort()
            return
        stream = UTPStream(self._ep, sock, addr)
        self._queue.append(stream)
        self._lot.unpark()

    def _report(self, exc: BaseException) -> None:
        if self.on_error is not None:
            self.on_error(exc)
        elif self._pending_error is None:
            self._pending_error = exc
            self._lot.unpark_all()

    async def accept(self) -> UTPStream:
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            if self._pending_error is not None:
                exc, self._pending_error = self._pending_error, None
                raise exc
            if self._queue:
                stream = self._queue.popleft()
                self.accepted += 1
                await trio.lowlevel.cancel_shielded_checkpoint()
                return stream
            if self._closed:
                raise trio.ClosedResourceError("the listener is closed")
            await self._lot.park()

    def _shutdown(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._ep.update_admission()
        while self._queue:
            self._queue.popleft()._abort()
        self._lot.unpark_all()

    async def aclose(self) -> None:
        self._shutdown()
        await trio.lowlevel.checkpoint()

    def statistics(self) -> dict[str, Any]:
        return {"queued": len(self._queue), "backlog": self.backlog, "accepted": self.accepted,
                "refused_backlog": self.refused_backlog, "refused_firewall": self.refused_firewall,
                "paused": self._paused}

    def __repr__(self) -> str:
        return f"<UTPListener on {self._ep.local_address}>"
