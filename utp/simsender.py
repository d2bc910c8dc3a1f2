"""utp.simsender -- a model of libtorrent's uTP sender for the simulator.

libtorrent 2.x (``src/utp_stream.cpp``) sends to us when we download from
it, and it gives up on a connection sooner than our own sender would.  What
of its behaviour decides whether our receiver keeps it going (issue 12):

- A selectively acknowledged packet stops counting as in flight, and new
  data may be sent while ``in flight + size <= min(cwnd, advertised
  window)``.  A receiver whose window ignores its reorder buffer therefore
  lets it run a whole window past the last SACKed packet.
- Each packet is fast-resent at most once (``m_fast_resend_seq_nr`` only
  moves forward); after that only a timeout resends the first unacked
  packet.  The timeout is pushed back by every valid packet from the peer.
- At a timeout, if the first unacked packet has already been sent
  ``utp_num_resends`` (3) times, the connection is dead: "Connection timed
  out".  So every packet gets three transmissions, and a receiver that
  drops one copy of it leaves it only one more.

``ModelSender`` dials an engine node, sends ``nbytes`` of seeded data that
way and records, for every packet, how many transmissions it needed and how
many of them the "wire" lost (the model loses them itself, with its own
seeded random generator, so it knows which copies reached the receiver).
"""

from __future__ import annotations

import random
import struct
from typing import Any

from .testing import Address, Network

__all__ = ["ModelSender"]

ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN = range(5)
_HEADER = struct.Struct(">BBHIIIHH")
_NUM_RESENDS = 3           # libtorrent's utp_num_resends default
_MIN_TIMEOUT_US = 500_000  # utp_min_timeout
_DUP_ACK_LIMIT = 3
_TICK_US = 50_000


class _Pkt:
    __slots__ = ("data", "size", "tx", "lost", "need_resend")

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.size = len(data)
        self.tx = 0
        self.lost = 0
        self.need_resend = False


class ModelSender:
    """Sends `nbytes` to the engine node at `target` the way libtorrent's
    uTP sender does (see the module docstring), with `payload` bytes per
    packet, a congestion window fixed at `cwnd` (so the receiver's window is
    what limits it once slow start has reached it) and each transmission lost with probability `loss`.

    After ``net.run``: ``done`` (everything acknowledged), ``dead`` (None
    or why it gave up, as libtorrent would), ``transmissions`` and
    ``lost_copies`` (per sequence number), ``timeouts``."""

    def __init__(self, net: Network, name: str, target: Address, nbytes: int, *,
                 payload: int = 1382, cwnd: int = 4 << 20, loss: float = 0.0,
                 seed: int = 1) -> None:
        self.net = net
        self.name = name
        self.addr = net.next_address()
        self._links: dict[Address, Any] = {}
        self._overhead = 28
        self.target = target
        self.rng = random.Random(seed)
        self.data = self.rng.randbytes(nbytes)
        self.payload, self.cwnd, self.loss = payload, cwnd, loss
        self.cwnd_now = 2 * payload           # slow start up to cwnd, as libtorrent
        self.recv_id = self.rng.getrandbits(16)
        self.send_id = (self.recv_id + 1) & 0xFFFF
        self.isn = self.rng.getrandbits(16)
        self.next_seq = (self.isn + 1) & 0xFFFF
        self.acked = self.isn                 # everything up to here is acknowledged
        self.offset = 0                       # bytes packetised so far
        self.outbuf: dict[int, _Pkt] = {}
        self.in_flight = 0
        self.adv_wnd = 0
        self.fast_resend_seq = self.next_seq
        self.connected = False
        self.timeout_at = 0
        self.num_timeouts = 0
        self.timeouts = 0
        self.reply_micro = 0
        self.rx_ack = 0                       # the engine's DATA we acknowledge (none)
        self.dead: str | None = None
        self.done = False
        self.closed = False
        self.transmissions: dict[int, int] = {}
        self.lost_copies: dict[int, int] = {}
        net.add_peer(self)
        self._syn()
        net.every(_TICK_US, self._tick, until=None)

    def close(self) -> None:
        self.closed = True

    # ---- wire -------------------------------------------------------------

    def _emit(self, ptype: int, seq: int, body: bytes = b"") -> bool:
        conn_id = self.recv_id if ptype == ST_SYN else self.send_id
        head = _HEADER.pack((ptype << 4) | 1, 0, conn_id, self.net.now & 0xFFFFFFFF,
                            self.reply_micro, 1 << 20, seq, 0 if ptype == ST_SYN else self.rx_ack)
        if self.loss and self.rng.random() < self.loss:
            return False
        self.net._route(self, head + body, self.target, 0)  # type: ignore[arg-type]
        return True

    def _syn(self) -> None:
        self._emit(ST_SYN, self.isn)
        self.timeout_at = self.net.now + 3_000_000

    def _transmit(self, seq: int, p: _Pkt) -> None:
        p.tx += 1
        self.transmissions[seq] = p.tx
        if p.need_resend or p.tx == 1:
            self.in_flight += p.size
        p.need_resend = False
        if not self._emit(ST_DATA, seq, p.data):
            p.lost += 1
            self.lost_copies[seq] = p.lost

    # ---- receiving ----------------------------------------------------------

    def _receive(self, data: bytes, src: Address) -> None:
        if self.dead or self.closed or len(data) < 20:
            return
        b0, ext, conn_id, ts, _tsd, wnd, seq, ack = _HEADER.unpack_from(data)
        if conn_id != self.recv_id:
            return
        ptype = b0 >> 4
        if ptype == ST_RESET:
            self.dead = "reset"
            return
        if not self.connected:
            if ptype != ST_STATE or ack != self.isn:
                return
            self.connected = True
            self.rx_ack = (seq - 1) & 0xFFFF
        self.reply_micro = (self.net.now - ts) & 0xFFFFFFFF
        self.num_timeouts = 0
        self.timeout_at = self.net.now + self._packet_timeout()
        self.adv_wnd = wnd
        if ptype in (ST_DATA, ST_FIN):
            self.rx_ack = seq
        self._cumulative(ack)
        off, sack = 20, b""
        while ext:
            if off + 2 > len(data):
                return
            nxt, ln = data[off], data[off + 1]
            if ext == 1:
                sack = data[off + 2:off + 2 + ln]
            ext, off = nxt, off + 2 + ln
        if sack:
            self._sack(ack, sack)
        self._pump()

    def _remove(self, seq: int) -> None:
        p = self.outbuf.pop(seq, None)
        if p is not None:
            self.cwnd_now = min(self.cwnd, self.cwnd_now + p.size)   # slow start
            if not p.need_resend:
                self.in_flight -= p.size

    def _cumulative(self, ack: int) -> None:
        span = (ack - self.acked) & 0xFFFF
        if span == 0 or span > ((self.next_seq - 1 - self.acked) & 0xFFFF):   # old, or unsent
            return
        for k in range(1, span + 1):
            self._remove((self.acked + k) & 0xFFFF)
        self.acked = ack
        if ((self.fast_resend_seq - self.acked - 1) & 0xFFFF) >= 0x8000:
            self.fast_resend_seq = (self.acked + 1) & 0xFFFF
        self._advance()

    def _advance(self) -> None:
        while self.acked != (self.next_seq - 1) & 0xFFFF and (self.acked + 1) & 0xFFFF not in self.outbuf:
            self.acked = (self.acked + 1) & 0xFFFF
        if not self.outbuf and self.offset >= len(self.data):
            self.done = True

    def _sack(self, ack: int, sack: bytes) -> None:
        have = [k for k in range(len(sack) * 8) if sack[k // 8] >> (k % 8) & 1]
        for k in have:
            self._remove((ack + 2 + k) & 0xFFFF)
        self._advance()
        if len(have) <= _DUP_ACK_LIMIT:
            return
        # Holes before the fourth-from-last SACKed packet that have not been
        # fast-resent yet: the first unacked packet and up to four more.
        limit = have[-(_DUP_ACK_LIMIT + 1)]
        holes = [(ack + 1) & 0xFFFF] + [(ack + 2 + k) & 0xFFFF for k in range(limit) if k not in have]
        for seq in holes[:5]:
            if ((seq - self.fast_resend_seq) & 0xFFFF) >= 0x8000 or seq not in self.outbuf:
                continue
            self._transmit(seq, self.outbuf[seq])    # fast resend ignores the window
            self.fast_resend_seq = (seq + 1) & 0xFFFF

    # ---- sending ----------------------------------------------------------

    def _window(self) -> int:
        return min(self.cwnd_now, self.adv_wnd)

    def _pump(self) -> None:
        if self.dead or not self.connected:
            return
        for seq in sorted(self.outbuf, key=lambda s: (s - self.acked) & 0xFFFF):
            p = self.outbuf[seq]
            if p.need_resend:
                if self.in_flight > 0 and self.in_flight + p.size > self._window():
                    return
                self._transmit(seq, p)
        while self.offset < len(self.data) and self.in_flight + self.payload <= self._window():
            p = _Pkt(self.data[self.offset:self.offset + self.payload])
            self.offset += p.size
            seq = self.next_seq
            self.next_seq = (seq + 1) & 0xFFFF
            self.outbuf[seq] = p
            self._transmit(seq, p)

    def _packet_timeout(self) -> int:
        extra = (1 << (self.num_timeouts - 1)) * 1_000_000 if self.num_timeouts else 0
        return _MIN_TIMEOUT_US + extra

    def _tick(self) -> bool:
        if self.dead or self.done or self.closed:
            return False
        if self.net.now <= self.timeout_at:
            return True
        if not self.connected:
            self.dead = "no answer to the SYN"
            return False
        if self.outbuf:
            self.num_timeouts += 1
            self.timeouts += 1
        if self.num_timeouts > _NUM_RESENDS:
            self.dead = "Connection timed out (no valid packet)"
            return False
        for p in self.outbuf.values():
            if not p.need_resend:
                p.need_resend = True
                self.in_flight -= p.size
        self.timeout_at = self.net.now + self._packet_timeout()
        self.cwnd_now = self.payload          # libtorrent: one packet after a timeout
        first = (self.acked + 1) & 0xFFFF
        p = self.outbuf.get(first)
        if p is not None:
            if p.tx >= _NUM_RESENDS:
                self.dead = f"Connection timed out (packet {first} sent {p.tx} times)"
                return False
            if self.fast_resend_seq == first:
                self.fast_resend_seq = (first + 1) & 0xFFFF
            self._transmit(first, p)
        self._pump()
        return True
