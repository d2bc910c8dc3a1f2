"""The peer-wire protocol core: one connection's state, bytes and ``now`` in,
bytes and events out (h11's shape, :class:`_utpkit.contract.StreamCore`).

Drive it::

    core = PeerWire(now=t, geometry=Geometry(total, piece_len))
    core.send(Handshake.make(infohash, our_id))      # initiator: at once
    stream.send_all(core.data_to_send())
    core.receive_data(chunk, now)                    # raises WireError
    while (ev := core.next_event()) is not None: ...
    # acceptor: on the peer's Handshake event, core.send(our Handshake)
    # for the torrent ev.infohash names (one listener, many torrents)

Incoming events are the wire messages themselves (:mod:`bt.wire`) plus
:class:`RequestsDropped` and :class:`ConnectionClosed`.  The core enforces
what the spec and common sense require of the peer -- message sizes, the
first-message rule for bitfields, Fast Extension and extension-protocol
messages only when negotiated, valid indices and blocks, no more outstanding
requests than our ``reqq``, no unrequested blocks -- and raises
:class:`WireError` with a :class:`Violation` for each breach, after which it
stays in the error state.  It never reads a clock: ``now`` comes in.

What it does *not* decide: which blocks to request (bt.picker), whom to
unchoke (bt.choker), what we have on disk (the caller's ``send(Have)``).
"""

from __future__ import annotations

import collections
import itertools
import struct
from dataclasses import dataclass
from typing import Any

from _utpkit.contract import StrEnum
from _utpkit.errors import LocalProtocolError

from .wire import (BLOCK_SIZE, HANDSHAKE_LEN, MAX_EXTENDED_LEN, AllowedFast, Bitfield, Cancel,
                   Choke, Event, Extended, ExtensionHandshake, Geometry, Handshake, Have,
                   HaveAll, HaveNone, Interested, KeepAlive, NotInterested, Piece, Port, Reject,
                   Request, Suggest, UnknownMessage, Unchoke, Violation, WireError,
                   decode_message_untrusted, encode_handshake, encode_message,
                   parse_handshake_untrusted)

__all__ = ["PeerWire", "ConnState", "RequestsDropped", "ConnectionClosed",
           "DEFAULT_REQQ", "PEER_DEFAULT_REQQ", "KEEPALIVE_INTERVAL", "IDLE_TIMEOUT",
           "HANDSHAKE_TIMEOUT"]

#: Outstanding requests we accept from a peer, advertised as ``reqq``: what
#: libtorrent 2.1.1 advertises (measured: 2000; older settings_pack
#: defaults were 250 and 500).  Deep queues keep a fast peer busy; the
#: cost is a dictionary entry per request.
DEFAULT_REQQ = 2000
#: What we assume of a peer that does not advertise ``reqq`` (BEP 10 names
#: libtorrent's old default, 250).
PEER_DEFAULT_REQQ = 250
#: BEP 3 suggests a keep-alive every two minutes, but libtorrent closes a
#: peer silent for 120 s (peer_timeout): one sent at 120 s races its
#: timer.  We do as libtorrent itself does (keep_alive() after half its
#: peer_timeout): send one after 60 s of our own silence.
KEEPALIVE_INTERVAL = 60.0
#: A peer silent this long is gone: 1.5x the two-minute keep-alive period
#: that some clients use exactly.
IDLE_TIMEOUT = 180.0
#: libtorrent's handshake_timeout is 10 s; we allow a slow NAT path more.
HANDSHAKE_TIMEOUT = 20.0
#: The largest bitfield accepted before the torrent's size is known (a
#: magnet link): 2^20 pieces.
_MAX_BITFIELD_UNKNOWN = 1 << 17
#: Requests we cancelled or that a choke dropped, remembered so a block
#: already in flight is not taken for an unrequested one.
_MAX_CANCELLED = 2048
_MAX_ALLOWED_FAST = 256
_L4 = struct.Struct(">I")


class ConnState(StrEnum):
    HANDSHAKE = "handshake"           # waiting for the peer's handshake
    AWAIT_CONFIRM = "await_confirm"   # got theirs first: send(Handshake) to accept
    OPEN = "open"
    CLOSED = "closed"                 # the peer closed the stream
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class RequestsDropped(Event):
    """The peer choked us without the Fast Extension: by BEP 3 it discarded
    these requests of ours, and they will not be answered.  Give them back
    to the picker."""
    requests: tuple[Request, ...]


@dataclass(frozen=True, slots=True)
class ConnectionClosed(Event):
    """The peer closed the stream (``receive_data(b"")``)."""


_STATE_MESSAGES = (Bitfield, HaveAll, HaveNone, Have, Choke, Unchoke, Interested, NotInterested,
                   Request, Piece, Cancel, Reject, Suggest, AllowedFast)
_FAST_ONLY = (HaveAll, HaveNone, Reject, Suggest, AllowedFast)


class PeerWire:
    """One peer connection's protocol state (see the module docstring).

    ``geometry`` may be None until the metadata is known (a magnet link);
    then indices go unchecked until :meth:`set_geometry`.  ``reqq`` is how
    many requests the peer may have outstanding with us."""

    def __init__(self, *, now: float, geometry: Geometry | None = None,
                 reqq: int = DEFAULT_REQQ, keepalive_interval: float = KEEPALIVE_INTERVAL,
                 idle_timeout: float = IDLE_TIMEOUT,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT) -> None:
        self.state = ConnState.HANDSHAKE
        self.geometry = geometry
        self.reqq = reqq
        self._keepalive_interval = keepalive_interval
        self._idle_timeout = idle_timeout
        self._handshake_deadline = now + handshake_timeout
        self._now = now
        self._last_recv = now
        self._last_sent = now
        self.our_handshake: Handshake | None = None
        self.peer_handshake: Handshake | None = None
        self.error: WireError | None = None
        # negotiated (both sides set the bit)
        self.fast = False
        self.extensions = False
        self.dht = False
        # BEP 3 choke/interest, both directions
        self.am_choking = True
        self.am_interested = False
        self.peer_choking = True
        self.peer_interested = False
        # requests the peer has outstanding with us / we with the peer
        self._incoming: dict[tuple[int, int, int], None] = {}
        self._outgoing: dict[tuple[int, int, int], None] = {}
        self._cancelled: collections.OrderedDict[tuple[int, int, int], None] = \
            collections.OrderedDict()
        self.allowed_fast_out: set[int] = set()    # we let the peer request these choked
        self.allowed_fast_in: set[int] = set()     # the peer lets us
        self._we_have: set[int] = set()
        self._we_have_all = False
        self._peer_sent_first = False
        self._we_sent_first = False
        # extension protocol: name -> the peer's id, and our id -> name
        self.peer_extensions: dict[str, int] = {}
        self.peer_ext_handshake: ExtensionHandshake | None = None
        self._our_ext_names: dict[int, str] = {}
        self.peer_reqq = PEER_DEFAULT_REQQ
        self._buf = bytearray()
        self._events: collections.deque[Event] = collections.deque()
        self._out: list[bytes | memoryview] = []
        self.counters: collections.Counter[str] = collections.Counter()

    # ---- StreamCore ------------------------------------------------------------------------

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the peer, in order; ``b""`` is end of stream.

        Raises :class:`WireError` on any violation; the core is then in
        the ERROR state and every later call raises the same error."""
        if self.error is not None:
            raise self.error
        if self.state is ConnState.CLOSED:
            raise LocalProtocolError("receive_data after the peer closed the stream")
        self._now = now
        if not data:
            self.state = ConnState.CLOSED
            self._events.append(ConnectionClosed())
            return
        self._last_recv = now
        try:
            self._feed(bytes(data))
        except WireError as exc:
            self._fail(exc)
            raise

    def next_event(self) -> Event | None:
        return self._events.popleft() if self._events else None

    def data_to_send(self) -> bytes:
        out = b"".join(self._out)
        self._out.clear()
        return out

    def get_timer(self) -> float | None:
        if self.state in (ConnState.HANDSHAKE, ConnState.AWAIT_CONFIRM):
            return self._handshake_deadline
        if self.state is not ConnState.OPEN:
            return None
        return min(self._last_recv + self._idle_timeout,
                   self._last_sent + self._keepalive_interval)

    def handle_timer(self, now: float) -> None:
        """Keep-alives, and the timeouts: raises WireError(HANDSHAKE_TIMEOUT
        or IDLE_TIMEOUT) when the peer has been silent too long."""
        if self.error is not None or self.state is ConnState.CLOSED:
            return
        self._now = now
        if self.state is not ConnState.OPEN:
            if now >= self._handshake_deadline:
                self._fail(WireError(Violation.HANDSHAKE_TIMEOUT, "no handshake in time"))
                raise self.error  # type: ignore[misc]
            return
        if now >= self._last_recv + self._idle_timeout:
            self._fail(WireError(Violation.IDLE_TIMEOUT,
                                 f"nothing received for {now - self._last_recv:.0f} s"))
            raise self.error  # type: ignore[misc]
        if now >= self._last_sent + self._keepalive_interval:
            self._queue(KeepAlive())

    def send(self, event: Event) -> None:
        """Queue a message for the peer (see the module docstring for the
        automatic parts: Rejects on choke and cancel with the Fast
        Extension).  LocalProtocolError when the message is not allowed
        now.  A Piece or Reject for a request the peer no longer has
        outstanding (it cancelled, or we choked) is dropped and counted:
        that is a race, not a mistake."""
        if self.error is not None or self.state in (ConnState.CLOSED, ConnState.ERROR):
            raise LocalProtocolError(f"cannot send on a connection in state {self.state}")
        if isinstance(event, Handshake):
            self._send_handshake(event)
            return
        if self.state is not ConnState.OPEN:
            raise LocalProtocolError(f"{type(event).__name__} before the handshake completed")
        handler = _SEND.get(type(event))
        if handler is None:
            raise LocalProtocolError(f"{type(event).__name__} is not a message")
        handler(self, event)

    # ---- queries ---------------------------------------------------------------------------

    @property
    def outstanding(self) -> int:
        """How many of our requests the peer has not answered."""
        return len(self._outgoing)

    def outstanding_requests(self) -> list[Request]:
        return [Request(*k) for k in self._outgoing]

    def incoming_requests(self, limit: int | None = None) -> list[Request]:
        """The peer's requests we have not served, oldest first (at most
        ``limit``: a server takes a few at a time from a queue of 2000)."""
        keys = self._incoming if limit is None else itertools.islice(self._incoming, limit)
        return [Request(*k) for k in keys]

    def is_requested(self, key: tuple[int, int, int]) -> bool:
        """Whether the peer still wants block ``key`` (not served, not
        cancelled, not dropped by a choke): O(1), for a server that read
        the block from disk in the meantime."""
        return key in self._incoming

    def set_geometry(self, geometry: Geometry) -> None:
        """The torrent's shape became known (metadata fetched)."""
        self.geometry = geometry

    def check_bitfield(self, bits: bytes) -> None:
        """WireError(BAD_BITFIELD) unless ``bits`` fits the geometry: for a
        bitfield that arrived before the geometry was known."""
        self._check_bitfield(bits)

    def statistics(self) -> dict[str, Any]:
        return {"state": str(self.state), "outstanding": len(self._outgoing),
                "incoming_requests": len(self._incoming), **self.counters}

    # ---- receiving -------------------------------------------------------------------------

    def _fail(self, exc: WireError) -> None:
        self.error = exc
        self.state = ConnState.ERROR
        self._buf.clear()

    def _max_len(self) -> int:
        bits = self.geometry.bitfield_len if self.geometry else _MAX_BITFIELD_UNKNOWN
        return max(9 + BLOCK_SIZE, 2 + MAX_EXTENDED_LEN, 1 + bits)

    def _feed(self, data: bytes) -> None:
        if self.state is ConnState.HANDSHAKE:
            need = HANDSHAKE_LEN - len(self._buf)
            self._buf += data[:need]
            data = data[need:]
            if len(self._buf) < HANDSHAKE_LEN:
                if bytes(self._buf[:20]) != b"\x13BitTorrent protocol"[:len(self._buf)]:
                    parse_handshake_untrusted(bytes(self._buf).ljust(HANDSHAKE_LEN, b"\0"))
                return
            hs = parse_handshake_untrusted(bytes(self._buf))
            self._buf.clear()
            self.peer_handshake = hs
            if self.our_handshake is None:
                self.state = ConnState.AWAIT_CONFIRM
            else:
                if hs.infohash != self.our_handshake.infohash:
                    raise WireError(Violation.INFOHASH_MISMATCH,
                                    f"peer answered for {hs.infohash.hex()}")
                self._open()
            self._events.append(hs)
        if self.state is ConnState.AWAIT_CONFIRM:
            # Which messages are legal depends on the bits both sides set:
            # hold the bytes until the caller answers with its handshake.
            if len(self._buf) + len(data) > self._max_len() + 4:
                raise WireError(Violation.BUFFER_OVERFLOW, "too much data before our handshake")
            self._buf += data
            return
        if data:
            self._parse(data)

    def _parse(self, data: bytes) -> None:
        max_len = self._max_len()
        buf = self._buf
        mv = memoryview(data)
        n = len(mv)
        pos = 0
        if buf:
            # Finish the message split across reads (a copy of one message),
            # then parse the rest of ``data`` in place.
            if len(buf) < 4:
                pos = min(n, 4 - len(buf))
                buf += mv[:pos]
                if len(buf) < 4:
                    return
            length = _L4.unpack_from(buf)[0]
            if length > max_len:
                raise WireError(Violation.MESSAGE_TOO_LONG, f"message of {length} bytes")
            take = min(n - pos, length + 4 - len(buf))
            buf += mv[pos:pos + take]
            pos += take
            if len(buf) < length + 4:
                return
            body = memoryview(bytes(buf))[4:]
            buf.clear()
            self._on_message(decode_message_untrusted(body))
        while n - pos >= 4:
            length = _L4.unpack_from(mv, pos)[0]
            if length > max_len:
                raise WireError(Violation.MESSAGE_TOO_LONG, f"message of {length} bytes")
            if n - pos - 4 < length:
                break
            body = mv[pos + 4:pos + 4 + length]
            pos += 4 + length
            self._on_message(decode_message_untrusted(body))
        buf += mv[pos:]

    def _check_index(self, index: int) -> None:
        if self.geometry is not None and index >= self.geometry.num_pieces:
            raise WireError(Violation.BAD_INDEX,
                            f"piece {index} of a torrent with {self.geometry.num_pieces}")

    def _check_block(self, index: int, begin: int, length: int) -> None:
        self._check_index(index)
        g = self.geometry
        bad = length == 0 or length > BLOCK_SIZE or (
            g is not None and begin + length > g.piece_size(index))
        if bad:
            raise WireError(Violation.BAD_BLOCK, f"block {begin}+{length} of piece {index}")

    def _on_message(self, msg: Any) -> None:
        t = type(msg)
        if t in _FAST_ONLY and not self.fast:
            raise WireError(Violation.NOT_NEGOTIATED, f"{t.__name__} without the Fast Extension")
        if t in (Bitfield, HaveAll, HaveNone):
            if self._peer_sent_first:
                raise WireError(Violation.LATE_BITFIELD, f"{t.__name__} after other messages")
            if t is Bitfield:
                self._check_bitfield(msg.bits)
        if t in _STATE_MESSAGES:
            self._peer_sent_first = True
        handler = _RECV.get(t)
        if handler is None or handler(self, msg):
            self._events.append(msg)

    def _check_bitfield(self, bits: bytes) -> None:
        g = self.geometry
        if g is None:
            return
        if len(bits) != g.bitfield_len:
            raise WireError(Violation.BAD_BITFIELD,
                            f"{len(bits)} bytes for {g.num_pieces} pieces")
        spare = g.bitfield_len * 8 - g.num_pieces
        if spare and bits[-1] & ((1 << spare) - 1):
            raise WireError(Violation.BAD_BITFIELD, "spare bits set")

    def _r_have(self, msg: Have | Suggest) -> bool:
        self._check_index(msg.index)
        return True

    def _r_allowed_fast(self, msg: AllowedFast) -> bool:
        self._check_index(msg.index)
        if len(self.allowed_fast_in) < _MAX_ALLOWED_FAST:
            self.allowed_fast_in.add(msg.index)
        return True

    def _r_choke(self, msg: Choke) -> bool:
        self.peer_choking = True
        self._events.append(msg)
        if not self.fast and self._outgoing:
            # BEP 3: a choke discards every request.  Remember them, since a
            # block may still cross the choke from a lax peer.
            dropped = tuple(Request(*k) for k in self._outgoing)
            for k in self._outgoing:
                self._remember_cancel(k)
            self._outgoing.clear()
            self._events.append(RequestsDropped(dropped))
        return False

    def _r_unchoke(self, msg: Unchoke) -> bool:
        self.peer_choking = False
        return True

    def _r_interested(self, msg: Interested | NotInterested) -> bool:
        self.peer_interested = type(msg) is Interested
        return True

    def _r_request(self, msg: Request) -> bool:
        self._check_block(msg.index, msg.begin, msg.length)
        k = msg.key
        if k in self._incoming:
            self.counters["duplicate_requests"] += 1
            return False
        allowed = (not self.am_choking or msg.index in self.allowed_fast_out) and (
            self._we_have_all or msg.index in self._we_have)
        if not allowed:
            # BEP 3 peers may race our choke; BEP 6 peers get an answer.
            self.counters["refused_requests"] += 1
            if self.fast:
                self._queue(Reject(*k))
            return False
        if len(self._incoming) >= self.reqq:
            raise WireError(Violation.REQUEST_FLOOD, f"more than {self.reqq} requests outstanding")
        self._incoming[k] = None
        return True

    def _r_cancel(self, msg: Cancel) -> bool:
        k = msg.key
        if k not in self._incoming:
            self.counters["stray_cancels"] += 1
            return False
        del self._incoming[k]
        if self.fast:
            # BEP 6: every request gets exactly one answer, a cancelled one too.
            self._queue(Reject(*k))
        return True

    def _answered(self, k: tuple[int, int, int]) -> bool | None:
        """The peer answered our request ``k`` (a block or a reject): True
        if it was outstanding, False if we had cancelled it (or a choke had
        dropped it) and the answer crossed that on the wire, None if we
        never asked."""
        if k in self._outgoing:
            del self._outgoing[k]
            return True
        if k in self._cancelled:
            del self._cancelled[k]
            return False
        return None

    def _r_piece(self, msg: Piece) -> bool:
        state = self._answered(msg.key)
        if state is None:
            raise WireError(Violation.UNREQUESTED_PIECE, f"block {msg.key} was never requested")
        if state is False:
            self.counters["late_pieces"] += 1
        return True

    def _r_reject(self, msg: Reject) -> bool:
        state = self._answered(msg.key)
        if state is None:
            self.counters["stray_rejects"] += 1
        return bool(state)

    def _r_ext_handshake(self, msg: ExtensionHandshake) -> bool:
        if not self.extensions:
            raise WireError(Violation.NOT_NEGOTIATED, "extension handshake without the bit")
        # BEP 10: a later handshake updates the map; id 0 disables a name.
        for name, ext_id in msg.m.items():
            if ext_id:
                self.peer_extensions[name] = ext_id
            else:
                self.peer_extensions.pop(name, None)
        if msg.reqq is not None:
            self.peer_reqq = msg.reqq
        self.peer_ext_handshake = msg
        return True

    def _r_extended(self, msg: Extended) -> bool:
        if not self.extensions:
            raise WireError(Violation.NOT_NEGOTIATED, "extended message without the bit")
        name = self._our_ext_names.get(msg.ext_id)
        if name is None:
            raise WireError(Violation.BAD_EXTENDED, f"extended id {msg.ext_id} we never offered")
        self._events.append(Extended(msg.ext_id, msg.payload, name))
        return False

    def _r_unknown(self, msg: UnknownMessage) -> bool:
        self.counters["unknown_messages"] += 1
        return True

    # ---- sending ---------------------------------------------------------------------------

    def _queue(self, msg: Any) -> None:
        self._out.extend(encode_message(msg))
        self._last_sent = self._now

    def _open(self) -> None:
        ours, theirs = self.our_handshake, self.peer_handshake
        assert ours is not None and theirs is not None
        self.fast = ours.fast and theirs.fast
        self.extensions = ours.extensions and theirs.extensions
        self.dht = ours.dht and theirs.dht
        self.state = ConnState.OPEN

    def _send_handshake(self, hs: Handshake) -> None:
        if self.our_handshake is not None:
            raise LocalProtocolError("handshake already sent")
        if self.peer_handshake is not None and hs.infohash != self.peer_handshake.infohash:
            raise LocalProtocolError("our handshake must name the infohash the peer asked for")
        self.our_handshake = hs
        self._out.append(encode_handshake(hs))
        self._last_sent = self._now
        if self.state is ConnState.AWAIT_CONFIRM:
            self._open()
            held = bytes(self._buf)
            self._buf.clear()
            if held:
                try:
                    self._parse(held)
                except WireError as exc:
                    self._fail(exc)
                    raise

    def _s_first(self, msg: Bitfield | HaveAll | HaveNone) -> None:
        if self._we_sent_first:
            raise LocalProtocolError(f"{type(msg).__name__} must be our first message")
        if type(msg) is not Bitfield and not self.fast:
            raise LocalProtocolError(f"{type(msg).__name__} needs the Fast Extension")
        if type(msg) is Bitfield:
            if self.geometry is not None and len(msg.bits) != self.geometry.bitfield_len:
                raise LocalProtocolError(f"bitfield of {len(msg.bits)} bytes for "
                                         f"{self.geometry.num_pieces} pieces")
            self._we_have.update(msg.indices())
        self._we_have_all = type(msg) is HaveAll
        self._s_plain(msg)

    def _s_plain(self, msg: Any) -> None:
        if type(msg) in _STATE_MESSAGES:
            self._we_sent_first = True
        self._queue(msg)

    def _s_fast(self, msg: Any) -> None:
        if not self.fast:
            raise LocalProtocolError(f"{type(msg).__name__} needs the Fast Extension")
        if type(msg) is AllowedFast:
            self.allowed_fast_out.add(msg.index)
        self._s_plain(msg)

    def _s_have(self, msg: Have) -> None:
        self._we_have.add(msg.index)
        self._s_plain(msg)

    def _s_choke(self, msg: Choke) -> None:
        self.am_choking = True
        self._s_plain(msg)
        if self.fast:
            # BEP 6: a choke no longer discards requests silently: reject all
            # but the allowed-fast ones.
            for k in [k for k in self._incoming if k[0] not in self.allowed_fast_out]:
                del self._incoming[k]
                self._queue(Reject(*k))
        else:
            self._incoming.clear()

    def _s_unchoke(self, msg: Unchoke) -> None:
        self.am_choking = False
        self._s_plain(msg)

    def _s_interest(self, msg: Interested | NotInterested) -> None:
        self.am_interested = type(msg) is Interested
        self._s_plain(msg)

    def _s_request(self, msg: Request) -> None:
        k = msg.key
        if self.geometry is not None and not self.geometry.valid_block(*k):
            raise LocalProtocolError(f"request {k} outside the torrent")
        if self.peer_choking and msg.index not in self.allowed_fast_in:
            raise LocalProtocolError(f"request for piece {msg.index} while the peer chokes us")
        if k in self._outgoing:
            raise LocalProtocolError(f"request {k} already outstanding")
        self._cancelled.pop(k, None)
        self._outgoing[k] = None
        self._s_plain(msg)

    def _remember_cancel(self, k: tuple[int, int, int]) -> None:
        self._cancelled[k] = None
        if len(self._cancelled) > _MAX_CANCELLED:
            self._cancelled.popitem(last=False)

    def _s_cancel(self, msg: Cancel) -> None:
        k = msg.key
        if k not in self._outgoing:
            return      # answered meanwhile: nothing to cancel
        del self._outgoing[k]
        self._remember_cancel(k)
        self._s_plain(msg)

    def _s_answer(self, msg: Piece | Reject) -> None:
        if type(msg) is Reject and not self.fast:
            raise LocalProtocolError("Reject needs the Fast Extension")
        k = msg.key
        if k not in self._incoming:
            self.counters["answers_dropped"] += 1
            return
        del self._incoming[k]
        self._s_plain(msg)

    def _s_ext_handshake(self, msg: ExtensionHandshake) -> None:
        if not self.extensions:
            raise LocalProtocolError("the peer did not set the extension protocol bit")
        for name, ext_id in msg.m.items():
            for old in [i for i, n in self._our_ext_names.items() if n == name]:
                del self._our_ext_names[old]
            if ext_id:
                self._our_ext_names[ext_id] = name
        self._s_plain(msg)

    def _s_extended(self, msg: Extended) -> None:
        if not self.extensions:
            raise LocalProtocolError("the peer did not set the extension protocol bit")
        ext_id = self.peer_extensions.get(msg.name)
        if ext_id is None:
            raise LocalProtocolError(f"the peer does not support extension {msg.name!r}")
        self._s_plain(Extended(ext_id, msg.payload, msg.name))


_RECV: dict[type, Any] = {
    Have: PeerWire._r_have, Suggest: PeerWire._r_have, AllowedFast: PeerWire._r_allowed_fast,
    Choke: PeerWire._r_choke, Unchoke: PeerWire._r_unchoke,
    Interested: PeerWire._r_interested, NotInterested: PeerWire._r_interested,
    Request: PeerWire._r_request, Cancel: PeerWire._r_cancel, Piece: PeerWire._r_piece,
    Reject: PeerWire._r_reject, ExtensionHandshake: PeerWire._r_ext_handshake,
    Extended: PeerWire._r_extended, UnknownMessage: PeerWire._r_unknown,
}

_SEND: dict[type, Any] = {
    Bitfield: PeerWire._s_first, HaveAll: PeerWire._s_first, HaveNone: PeerWire._s_first,
    Have: PeerWire._s_have, KeepAlive: PeerWire._s_plain, Port: PeerWire._s_plain,
    Choke: PeerWire._s_choke, Unchoke: PeerWire._s_unchoke,
    Interested: PeerWire._s_interest, NotInterested: PeerWire._s_interest,
    Request: PeerWire._s_request, Cancel: PeerWire._s_cancel,
    Piece: PeerWire._s_answer, Reject: PeerWire._s_answer,
    Suggest: PeerWire._s_fast, AllowedFast: PeerWire._s_fast,
    ExtensionHandshake: PeerWire._s_ext_handshake, Extended: PeerWire._s_extended,
}
