"""Peer exchange (BEP 11, extension ``ut_pex``), sans-I/O.

Each side tells each connected peer, at most once a minute, which peers it
is connected to that it has not told before (``added``, ``added6``, one
flags byte each in ``added.f`` / ``added6.f``) and which of those it told
before it is no longer connected to (``dropped``, ``dropped6``).  Compact
forms: 4-byte IPv4 + 2-byte port, 16-byte IPv6 + 2-byte port.

Why the numbers:

- :data:`PEX_INTERVAL` (60 s) is BEP 11's "at most once per minute";
  the first message goes out as soon as the peer's extension handshake is
  known (libtorrent sends its first one at its next one-second tick too),
  so a new peer learns the swarm at once, and only the later diffs wait.
- :data:`MAX_ADDED` / :data:`MAX_DROPPED` (50 each) bound a message
  (libtorrent caps added peers per message as well); what did not fit goes
  in the next one.
- Received: a payload over :data:`MAX_PEX_PAYLOAD`, anything that is not
  a dictionary of byte strings with whole compact entries, or flags whose
  count differs from the peers', is a violation (:class:`PexError`, the
  connection ends and it is counted); more than :data:`MAX_BURST`
  messages within :data:`PEX_INTERVAL` is flooding (libtorrent ends such
  connections too).  At most :data:`MAX_TAKEN` added peers of a message
  are used; entries with port 0 are skipped.

Flags (BEP 11): 0x01 prefers encryption, 0x02 seed (upload only), 0x04
supports uTP, 0x08 supports ``ut_holepunch`` (BEP 55: the sender can act
as the relay for it), 0x10 reachable (the sender's connection to it is
outgoing, so it accepts incoming connections).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from _utpkit.bencode import BencodeError, decode_untrusted, encode
from _utpkit.errors import RemoteProtocolError

__all__ = ["PexError", "PexPeer", "PexMessage", "PexSender", "PexReceiver", "encode_pex",
           "parse_pex_untrusted", "pack_addr", "unpack_addrs", "FLAG_ENCRYPTION", "FLAG_SEED",
           "FLAG_UTP", "FLAG_HOLEPUNCH", "FLAG_REACHABLE", "PEX_INTERVAL", "MAX_ADDED",
           "MAX_DROPPED", "MAX_PEX_PAYLOAD", "MAX_BURST", "MAX_TAKEN", "EXTENSION"]

EXTENSION = "ut_pex"
FLAG_ENCRYPTION = 0x01
FLAG_SEED = 0x02
FLAG_UTP = 0x04
FLAG_HOLEPUNCH = 0x08
FLAG_REACHABLE = 0x10

PEX_INTERVAL = 60.0
MAX_ADDED = 50
MAX_DROPPED = 50
MAX_PEX_PAYLOAD = 64 * 1024
MAX_BURST = 3
MAX_TAKEN = 100

#: An address: (ip text, port).
Addr = tuple[str, int]


class PexError(RemoteProtocolError):
    """A ut_pex message broke BEP 11 (or came too often); ``reason`` is a
    short counter key, the message says what exactly."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"ut_pex: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class PexPeer:
    addr: Addr
    flags: int = 0


@dataclass(frozen=True, slots=True)
class PexMessage:
    added: tuple[PexPeer, ...] = ()
    dropped: tuple[Addr, ...] = ()
    #: entries skipped (port 0, beyond MAX_TAKEN): for counters
    skipped: int = field(default=0, compare=False)


def pack_addr(addr: Addr) -> bytes:
    """The compact form: 6 bytes for IPv4 (or IPv4-mapped IPv6), 18 for IPv6."""
    ip = ipaddress.ip_address(addr[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = int(addr[1])
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} out of range")
    return ip.packed + struct.pack(">H", port)


def unpack_addrs(data: bytes, size: int) -> list[Addr]:
    """Compact entries of ``size`` (6 or 18) bytes; ValueError if ``data``
    is not whole entries."""
    if len(data) % size:
        raise ValueError(f"{len(data)} bytes are not whole {size}-byte entries")
    out = []
    for i in range(0, len(data), size):
        ip = ipaddress.ip_address(data[i:i + size - 2])
        out.append((str(ip), struct.unpack(">H", data[i + size - 2:i + size])[0]))
    return out


def encode_pex(added: Iterable[PexPeer], dropped: Iterable[Addr]) -> bytes:
    """The bencoded ut_pex payload (all six keys, empty where none)."""
    lists: dict[bytes, bytearray] = {k: bytearray() for k in
                                     (b"added", b"added.f", b"dropped",
                                      b"added6", b"added6.f", b"dropped6")}
    for p in added:
        packed = pack_addr(p.addr)
        six = b"6" if len(packed) == 18 else b""
        lists[b"added" + six] += packed
        lists[b"added" + six + b".f"].append(p.flags & 0xFF)
    for a in dropped:
        packed = pack_addr(a)
        lists[b"dropped" + (b"6" if len(packed) == 18 else b"")] += packed
    return encode({k: bytes(v) for k, v in lists.items()})


def parse_pex_untrusted(payload: bytes | memoryview) -> PexMessage:
    """Parse a received ut_pex payload; PexError for anything malformed."""
    if len(payload) > MAX_PEX_PAYLOAD:
        raise PexError("too_large", f"message of {len(payload)} bytes exceeds {MAX_PEX_PAYLOAD}")
    try:
        d = decode_untrusted(bytes(payload), max_size=MAX_PEX_PAYLOAD)
    except BencodeError as exc:
        raise PexError("bad_bencode", f"not bencoded: {exc}") from None
    if type(d) is not dict:
        raise PexError("not_dict", "message is not a dictionary")

    def entries(key: bytes, size: int) -> list[Addr]:
        val = d.get(key, b"")
        if type(val) is not bytes:
            raise PexError("bad_field", f"{key.decode()} is not a byte string")
        try:
            return unpack_addrs(val, size)
        except ValueError as exc:
            raise PexError("bad_length", f"{key.decode()}: {exc}") from None

    def flags(key: bytes, n: int) -> bytes:
        val = d.get(key)
        if val is None:
            return bytes(n)         # no flags sent: nothing known about them
        if type(val) is not bytes:
            raise PexError("bad_field", f"{key.decode()} is not a byte string")
        if len(val) != n:
            raise PexError("bad_flags", f"{key.decode()} has {len(val)} flags for {n} peers")
        return val

    added: list[PexPeer] = []
    dropped: list[Addr] = []
    skipped = 0
    for six, size in ((b"", 6), (b"6", 18)):
        new = entries(b"added" + six, size)
        fl = flags(b"added" + six + b".f", len(new))
        for addr, f in zip(new, fl):
            if addr[1] == 0 or len(added) >= MAX_TAKEN:
                skipped += 1
                continue
            added.append(PexPeer(addr, f))
        dropped += entries(b"dropped" + six, size)
    return PexMessage(tuple(added), tuple(dropped), skipped)


class PexSender:
    """What we told one peer: builds the next message from our current
    connections.  Call :meth:`build` each tick; it returns a payload when
    one is due and there is news (first one at once)."""

    def __init__(self, interval: float = PEX_INTERVAL) -> None:
        self.interval = interval
        self._told: dict[Addr, int] = {}
        self._next = float("-inf")
        self.sent = 0

    def build(self, now: float, current: Mapping[Addr, int]) -> bytes | None:
        """``current``: our connected peers to announce (address -> flags),
        without the peer this message goes to."""
        if now < self._next:
            return None
        added = [PexPeer(a, f) for a, f in current.items() if a not in self._told][:MAX_ADDED]
        dropped = [a for a in self._told if a not in current][:MAX_DROPPED]
        if not added and not dropped:
            return None
        for p in added:
            self._told[p.addr] = p.flags
        for a in dropped:
            del self._told[a]
        self._next = now + self.interval
        self.sent += 1
        return encode_pex(added, dropped)


class PexReceiver:
    """Checks one peer's messages: parsing and the rate (at most
    :data:`MAX_BURST` within :data:`PEX_INTERVAL`).  ``known`` is what this
    peer says it is connected to (added minus dropped), bounded: the
    holepunch initiator looks for a relay there."""

    def __init__(self, interval: float = PEX_INTERVAL, max_known: int = 1000) -> None:
        self.interval = interval
        self.max_known = max_known
        self._times: list[float] = []
        self.known: dict[Addr, int] = {}
        self.received = 0

    def receive(self, payload: bytes | memoryview, now: float) -> PexMessage:
        self._times = [t for t in self._times if now - t < self.interval]
        if len(self._times) >= MAX_BURST:
            raise PexError("too_frequent", f"more than {MAX_BURST} messages within "
                                           f"{self.interval:g} s")
        self._times.append(now)
        msg = parse_pex_untrusted(payload)
        self.received += 1
        for a in msg.dropped:
            self.known.pop(a, None)
        for p in msg.added:
            if p.addr in self.known or len(self.known) < self.max_known:
                self.known[p.addr] = p.flags
        return msg


def describe(msg: PexMessage) -> dict[str, Any]:
    """For logs: counts only."""
    return {"added": len(msg.added), "dropped": len(msg.dropped), "skipped": msg.skipped}
