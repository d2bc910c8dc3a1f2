"""utp.simpeers -- models of other uTP stacks' receivers for the simulator.

Our sender has to work against receivers that are not ours, and two of them
behave in ways that matter once packets are lost (issue 12):

- **libutp** (Transmission, libutp's ``ucat``) acknowledges once per read
  batch (its loop drains the socket, then calls ``utp_issue_deferred_acks``)
  and its selective ACK is always 4 bytes covering only the 30 packets after
  the first hole; anything received beyond that is invisible to the sender
  until the hole is repaired.
- **libtorrent** also acknowledges once per batch, but sizes its SACK to the
  bytes needed, ``(span + 7) / 8`` (at most 32), so most of its bitmaps are
  not the multiple of 4 bytes BEP 29 asks for.

``ModelReceiver`` accepts connections from an engine node, acknowledges the
way the chosen stack does, reassembles and hashes what it receives, and
closes with a FIN of its own after the sender's.  Put it behind a
``SocketBuffer`` (208 KiB, finite reader) to model a real host whose kernel
drops what does not fit.  ``transfer_to_peer`` runs one bulk transfer from an
engine node to such a receiver on the virtual clock.

Only the receive side is modelled (enough for our sender's behaviour); the
models never send data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import struct
from typing import Any

from .testing import Address, Network, Node, SimConnection, SocketBuffer, _delta

__all__ = ["ModelReceiver", "PeerTransfer", "transfer_to_peer", "STYLES"]

ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN = range(5)
_HEADER = struct.Struct(">BBHIIIHH")

#: Acknowledgement styles: libutp's (4-byte SACK of 30 bits) and
#: libtorrent's (byte-granular SACK up to 32 bytes).
STYLES = ("libutp", "libtorrent")

_REORDER_MAX = 1024         # packets past the first hole either stack buffers
_LIBUTP_SACK_BITS = 30      # libutp: min(14 + 16, reorder buffer) bits in 4 bytes
_LIBTORRENT_SACK_MAX = 32   # libtorrent: at most 32 bytes of bitmap
_FIN_RESEND_US = 500_000


def sack_bitmap(style: str, have: set[int], ack_nr: int) -> bytes:
    """The SACK bitmap `style` sends for received sequence numbers `have`
    (all after the first hole, ack_nr + 1): bit k stands for ack_nr + 2 + k."""
    if not have:
        return b""
    if style == "libutp":
        nbits, nbytes = _LIBUTP_SACK_BITS, 4
    else:
        top = max((s - ack_nr - 2) & 0xFFFF for s in have)
        nbytes = min((top + 1 + 7) // 8, _LIBTORRENT_SACK_MAX)
        nbits = nbytes * 8
    bits = bytearray(nbytes)
    for s in have:
        k = (s - ack_nr - 2) & 0xFFFF
        if k < nbits:
            bits[k // 8] |= 1 << (k % 8)
    return bytes(bits)


class _Conn:
    def __init__(self, addr: Address, syn_conn_id: int, syn_seq: int, isn: int) -> None:
        self.addr = addr
        self.send_id = syn_conn_id
        self.recv_id = (syn_conn_id + 1) & 0xFFFF
        self.ack_nr = syn_seq
        self.isn = isn
        self.reorder: dict[int, bytes | None] = {}   # seq -> payload (None: FIN)
        self.reorder_bytes = 0
        self.received = 0
        self.hash = hashlib.sha256()
        self.eof_seq: int | None = None
        self.eof = False
        self.fin_sent_at: int | None = None
        self.fin_acked = False
        self.reply_micro = 0
        self.ack_pending = False
        self.packets = 0
        self.duplicates = 0
        self.acks_sent = 0
        self.sack_lengths: dict[int, int] = {}


class ModelReceiver:
    """A uTP receiver acknowledging like libutp or libtorrent (`style`),
    optionally behind a ``SocketBuffer`` (`socket_buffer`: its parameters,
    or None for a reader that takes every datagram at once and acknowledges
    at the end of each instant).  `rcvbuf` is the window it advertises (the
    application reads at once, so only the reorder buffer uses it).

    Attributes: ``conns`` (by (address, receive id)), ``socket_buffer``;
    per connection ``received``, ``hash``, ``eof``, ``acks_sent``,
    ``sack_lengths`` (bitmap length -> how many sent)."""

    def __init__(self, net: Network, name: str, style: str = "libutp", *,
                 addr: Address | None = None, rcvbuf: int = 1 << 20,
                 socket_buffer: dict[str, Any] | None = None) -> None:
        if style not in STYLES:
            raise ValueError(f"style must be one of {STYLES}, not {style!r}")
        self.net = net
        self.name = name
        self.style = style
        self.addr = addr or net.next_address()
        self.rcvbuf = rcvbuf
        self._links: dict[Address, Any] = {}
        self._overhead = 28
        self.conns: dict[tuple[Address, int], _Conn] = {}
        self.socket_buffer: SocketBuffer | None = None
        self._flush_scheduled = False
        self.closed = False
        if socket_buffer is not None:
            self.socket_buffer = SocketBuffer(net, self._batch, **socket_buffer)
        net.add_peer(self)

    def __repr__(self) -> str:
        return f"<ModelReceiver {self.name} {self.style} {self.addr}>"

    def close(self) -> None:
        self.closed = True

    def conn_from(self, addr: Address) -> _Conn | None:
        """The (first) connection from `addr`."""
        for (a, _), c in self.conns.items():
            if a == addr:
                return c
        return None

    # ---- receiving --------------------------------------------------------

    def _receive(self, data: bytes, src: Address) -> None:
        if self.closed:
            return
        if self.socket_buffer is not None:
            self.socket_buffer.arrive(data, src)
            return
        self._packet(data, src)
        if not self._flush_scheduled:
            # No reader model: acknowledge once per instant, after every
            # datagram due now (an event at the same time runs after them).
            self._flush_scheduled = True
            self.net._schedule(self.net.now, self._flush_event, None)

    def _flush_event(self, _arg: Any) -> None:
        self._flush_scheduled = False
        self._send_acks()

    def _batch(self, batch: list[tuple[bytes, Address]]) -> None:
        for data, src in batch:
            self._packet(data, src)
        self._send_acks()

    def _packet(self, data: bytes, src: Address) -> None:
        if len(data) < 20 or data[0] & 15 != 1:
            return
        b0, ext, conn_id, ts, _tsd, _wnd, seq, ack = _HEADER.unpack_from(data)
        ptype = b0 >> 4
        off = 20
        while ext:                      # skip every extension
            if off + 2 > len(data) or off + 2 + data[off + 1] > len(data):
                return
            ext, off = data[off], off + 2 + data[off + 1]
        payload = data[off:]
        now = self.net.now
        if ptype == ST_SYN:
            key = (src, (conn_id + 1) & 0xFFFF)
            c = self.conns.get(key)
            if c is None:
                c = self.conns[key] = _Conn(src, conn_id, seq, self.net.rng.getrandbits(16))
            c.reply_micro = (now - ts) & 0xFFFFFFFF
            self._send(c, ST_STATE, c.isn)       # the SYN is answered at once
            return
        c = self.conns.get((src, conn_id))
        if c is None:
            return
        c.packets += 1
        c.reply_micro = (now - ts) & 0xFFFFFFFF
        if ptype == ST_STATE:
            if c.fin_sent_at is not None and ack == c.isn:
                c.fin_acked = True
            return
        if ptype not in (ST_DATA, ST_FIN):
            return
        c.ack_pending = True
        d = (seq - c.ack_nr - 1) & 0xFFFF
        if d >= 0x8000:
            c.duplicates += 1
            return
        if d >= _REORDER_MAX:
            return
        if ptype == ST_FIN:
            c.eof_seq = seq
        body: bytes | None = None if ptype == ST_FIN else bytes(payload)
        if d == 0:
            self._deliver(c, seq, body)
            while (c.ack_nr + 1) & 0xFFFF in c.reorder:
                nxt = (c.ack_nr + 1) & 0xFFFF
                held = c.reorder.pop(nxt)
                c.reorder_bytes -= len(held or b"")
                self._deliver(c, nxt, held)
        elif seq not in c.reorder:
            c.reorder[seq] = body
            c.reorder_bytes += len(body or b"")
        else:
            c.duplicates += 1

    def _deliver(self, c: _Conn, seq: int, body: bytes | None) -> None:
        c.ack_nr = seq
        if body:
            c.received += len(body)
            c.hash.update(body)
        if c.eof_seq is not None and c.ack_nr == c.eof_seq and not c.eof:
            c.eof = True

    # ---- sending ----------------------------------------------------------

    def _send_acks(self) -> None:
        now = self.net.now
        for c in self.conns.values():
            if c.ack_pending:
                c.ack_pending = False
                self._send(c, ST_STATE, (c.isn + 1) & 0xFFFF if c.fin_sent_at is not None else c.isn)
            if c.eof and not c.fin_acked and (
                    c.fin_sent_at is None or now - c.fin_sent_at >= _FIN_RESEND_US):
                # Our side closes after the sender's FIN, as ucat does.
                c.fin_sent_at = now
                self._send(c, ST_FIN, c.isn)
                self.net.call_later(_FIN_RESEND_US, self._send_acks)

    def _send(self, c: _Conn, ptype: int, seq: int) -> None:
        sack = sack_bitmap(self.style, set(c.reorder), c.ack_nr) if ptype != ST_SYN else b""
        wnd = max(self.rcvbuf - c.reorder_bytes, 0)
        head = _HEADER.pack((ptype << 4) | 1, 1 if sack else 0, c.send_id,
                            self.net.now & 0xFFFFFFFF, c.reply_micro, wnd, seq, c.ack_nr)
        if sack:
            head += bytes([0, len(sack)]) + sack
            c.sack_lengths[len(sack)] = c.sack_lengths.get(len(sack), 0) + 1
        c.acks_sent += 1
        self.net._route(self, head, c.addr, 0)  # type: ignore[arg-type]


@dataclasses.dataclass
class PeerTransfer:
    """What ``transfer_to_peer`` measured: bytes, virtual time, whether the
    receiver got them all with the right sha256 (``ok``), our sender's
    socket stats (``rexmit`` counts retransmission timeouts' resends,
    ``fastrexmit`` the others), its RTO count (``timeouts``), the link
    counters and the receiver's socket-buffer counters."""

    nbytes: int
    elapsed_us: int
    ok: bool
    goodput: float                 # bytes per second
    sender: dict[str, Any]
    timeouts: int
    a_to_peer: dict[str, Any]
    peer_to_a: dict[str, Any]
    socket_buffer: dict[str, int]
    sack_lengths: dict[int, int]
    acks: int
    conn: SimConnection


def transfer_to_peer(net: Network, a: Node, peer: ModelReceiver, nbytes: int, *,
                     timeout_us: int = 600_000_000) -> PeerTransfer:
    """Send `nbytes` from engine node `a` to `peer` over a new connection
    and run until the peer has them all and both FINs are acknowledged (or
    `timeout_us` of virtual time)."""
    ab, ba = net.get_link(a, peer), net.get_link(peer, a)  # type: ignore[arg-type]
    ab0, ba0 = ab.counters(), ba.counters()
    start = net.now
    ca = a.connect(peer.addr, close_when_done=True)
    ca.send(nbytes, shutdown=True)

    def received_all() -> bool:
        c = peer.conn_from(a.addr)
        return ca.error is not None or (c is not None and c.eof and c.received >= nbytes)

    complete = net.run(start + timeout_us, condition=received_all)
    end = net.now
    info = ca.sock.info()
    net.run(net.now + 60_000_000, condition=lambda: ca.destroyed_at is not None)
    c = peer.conn_from(a.addr)
    stats = ca.final_stats or ca.sock.stats()
    ok = (complete and ca.error is None and c is not None and c.received == nbytes
          and c.hash.hexdigest() == ca.sent_sha256)
    elapsed = max(end - start, 1)
    return PeerTransfer(
        nbytes=nbytes, elapsed_us=elapsed, ok=ok, goodput=nbytes / (elapsed / 1e6),
        sender=dict(stats), timeouts=int((ca.final_info or info).get("timeouts", 0)),
        a_to_peer=_delta(ab.counters(), ab0), peer_to_a=_delta(ba.counters(), ba0),
        socket_buffer=peer.socket_buffer.counters() if peer.socket_buffer else {},
        sack_lengths=dict(c.sack_lengths) if c else {}, acks=c.acks_sent if c else 0,
        conn=ca)
