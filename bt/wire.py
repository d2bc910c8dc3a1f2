"""The BitTorrent peer-wire codec: bytes to messages and back, no state.

Every message of BEP 3 (plus ``port`` from BEP 5), the Fast Extension's five
(BEP 6), the extension protocol's message 20 and its handshake (BEP 10), and
the 68-byte handshake with its reserved bits.  Messages are frozen, slotted
dataclasses validated on construction, so a message that exists is one the
wire can carry.  What is allowed *when* (choking, requests, the first
message) is the business of :mod:`bt.peerwire`, which keeps the state.

Functions that read peer bytes end in ``_untrusted`` and raise only
:class:`WireError` (a :class:`RemoteProtocolError` carrying a
:class:`Violation`).  A received piece's block is a memoryview into the
bytes the caller handed in: no copy on the hot path.
"""

from __future__ import annotations

import enum
import hashlib
import ipaddress
import struct
from dataclasses import dataclass, field
from typing import Any, Mapping, Union

from _utpkit.bencode import BencodeError, decode_untrusted, encode
from _utpkit.contract import Event as _CoreEvent
from _utpkit.contract import StrEnum
from _utpkit.errors import LocalProtocolError, RemoteProtocolError

__all__ = [
    "Event", "Violation", "WireError", "Geometry", "MsgId",
    "PROTOCOL", "HANDSHAKE_LEN", "BLOCK_SIZE", "MAX_EXTENDED_LEN",
    "Handshake", "KeepAlive", "Choke", "Unchoke", "Interested", "NotInterested", "Have",
    "Bitfield", "Request", "Piece", "Cancel", "Port", "Suggest", "HaveAll", "HaveNone",
    "Reject", "AllowedFast", "Extended", "ExtensionHandshake", "UnknownMessage", "Message",
    "encode_message", "decode_message_untrusted", "parse_handshake_untrusted",
    "allowed_fast_set",
]

PROTOCOL = b"\x13BitTorrent protocol"
HANDSHAKE_LEN = 68
#: The block size every client uses and the largest request we serve or
#: accept: BEP 3 says requests above 2^14 bytes may be refused, and
#: libtorrent and Transmission never send larger ones.
BLOCK_SIZE = 16384
#: An extended message carries at most a ut_metadata piece (16 KiB of
#: metadata after a small dictionary, BEP 9) or a PEX list; 1 KiB of room
#: for the dictionary.
MAX_EXTENDED_LEN = BLOCK_SIZE + 1024


class Event(_CoreEvent):
    """Base of every event and message of the ``bt`` package."""
    __slots__ = ()


class Violation(StrEnum):
    """Why a peer was disconnected: one member per protocol violation, so a
    driver can count disconnects by reason (``collections.Counter``); equal
    to its string value, so the counts serialise as they are (JSON-RPC)."""
    BAD_HANDSHAKE = "bad_handshake"
    INFOHASH_MISMATCH = "infohash_mismatch"
    MESSAGE_TOO_LONG = "message_too_long"
    BAD_LENGTH = "bad_length"               # a fixed-size message of the wrong size
    BAD_BITFIELD = "bad_bitfield"           # wrong size or spare bits set
    BAD_INDEX = "bad_index"                 # piece index beyond the torrent
    BAD_BLOCK = "bad_block"                 # begin/length outside the piece or > 16 KiB
    LATE_BITFIELD = "late_bitfield"         # bitfield / have all / have none not first
    NOT_NEGOTIATED = "not_negotiated"       # fast or extension message without the bit
    REQUEST_FLOOD = "request_flood"         # more outstanding requests than our reqq
    UNREQUESTED_PIECE = "unrequested_piece"
    BAD_EXTENDED = "bad_extended"           # bad extension handshake or unknown id
    IDLE_TIMEOUT = "idle_timeout"
    HANDSHAKE_TIMEOUT = "handshake_timeout"
    BUFFER_OVERFLOW = "buffer_overflow"     # too much data before we confirmed a handshake


class WireError(RemoteProtocolError):
    """The peer broke the peer-wire protocol; ``reason`` says how."""

    def __init__(self, reason: Violation, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason


class MsgId(enum.IntEnum):
    CHOKE = 0
    UNCHOKE = 1
    INTERESTED = 2
    NOT_INTERESTED = 3
    HAVE = 4
    BITFIELD = 5
    REQUEST = 6
    PIECE = 7
    CANCEL = 8
    PORT = 9            # BEP 5
    SUGGEST = 13        # BEP 6
    HAVE_ALL = 14
    HAVE_NONE = 15
    REJECT = 16
    ALLOWED_FAST = 17
    EXTENDED = 20       # BEP 10


def _u32(name: str, v: int) -> None:
    if type(v) is not int or not 0 <= v < 1 << 32:
        raise LocalProtocolError(f"{name} must be an integer in [0, 2**32), not {v!r}")


@dataclass(frozen=True, slots=True)
class Geometry:
    """The shape of a torrent as the wire sees it: how many pieces, how long
    each is (the last one may be shorter), and so which requests are valid."""
    total_length: int
    piece_length: int

    def __post_init__(self) -> None:
        if self.total_length <= 0 or self.piece_length <= 0:
            raise LocalProtocolError(f"torrent geometry needs positive sizes, not "
                                     f"{self.total_length}/{self.piece_length}")

    @property
    def num_pieces(self) -> int:
        return -(-self.total_length // self.piece_length)

    def piece_size(self, index: int) -> int:
        if index == self.num_pieces - 1:
            return self.total_length - index * self.piece_length
        return self.piece_length

    def num_blocks(self, index: int) -> int:
        return -(-self.piece_size(index) // BLOCK_SIZE)

    def block(self, index: int, n: int) -> "Request":
        """The ``n``-th block of piece ``index`` as a request."""
        begin = n * BLOCK_SIZE
        return Request(index, begin, min(BLOCK_SIZE, self.piece_size(index) - begin))

    @property
    def bitfield_len(self) -> int:
        return (self.num_pieces + 7) // 8

    def valid_block(self, index: int, begin: int, length: int) -> bool:
        return (0 <= index < self.num_pieces and 0 < length <= BLOCK_SIZE and begin >= 0
                and begin + length <= self.piece_size(index))


# ---- messages ------------------------------------------------------------------------------

_RESERVED_EXTENSION = (5, 0x10)   # BEP 10: the 20th bit from the right
_RESERVED_FAST = (7, 0x04)        # BEP 6
_RESERVED_DHT = (7, 0x01)         # BEP 5


@dataclass(frozen=True, slots=True)
class Handshake(Event):
    """The 68-byte opening of every connection (BEP 3).  ``reserved`` keeps
    all eight bytes; the properties read the bits we understand."""
    infohash: bytes
    peer_id: bytes
    reserved: bytes = bytes(8)

    def __post_init__(self) -> None:
        for name, v, n in (("infohash", self.infohash, 20), ("peer_id", self.peer_id, 20),
                           ("reserved", self.reserved, 8)):
            if type(v) is not bytes or len(v) != n:
                raise LocalProtocolError(f"handshake {name} must be {n} bytes, not {v!r}")

    @staticmethod
    def make(infohash: bytes, peer_id: bytes, *, extensions: bool = True, fast: bool = True,
             dht: bool = False) -> "Handshake":
        r = bytearray(8)
        for on, (i, bit) in ((extensions, _RESERVED_EXTENSION), (fast, _RESERVED_FAST),
                             (dht, _RESERVED_DHT)):
            if on:
                r[i] |= bit
        return Handshake(bytes(infohash), bytes(peer_id), bytes(r))

    @property
    def extensions(self) -> bool:
        return bool(self.reserved[5] & 0x10)

    @property
    def fast(self) -> bool:
        return bool(self.reserved[7] & 0x04)

    @property
    def dht(self) -> bool:
        return bool(self.reserved[7] & 0x01)


@dataclass(frozen=True, slots=True)
class KeepAlive(Event):
    pass


@dataclass(frozen=True, slots=True)
class Choke(Event):
    pass


@dataclass(frozen=True, slots=True)
class Unchoke(Event):
    pass


@dataclass(frozen=True, slots=True)
class Interested(Event):
    pass


@dataclass(frozen=True, slots=True)
class NotInterested(Event):
    pass


@dataclass(frozen=True, slots=True)
class HaveAll(Event):
    pass


@dataclass(frozen=True, slots=True)
class HaveNone(Event):
    pass


@dataclass(frozen=True, slots=True)
class _Index(Event):
    index: int

    def __post_init__(self) -> None:
        _u32("index", self.index)


@dataclass(frozen=True, slots=True)
class Have(_Index):
    pass


@dataclass(frozen=True, slots=True)
class Suggest(_Index):
    pass


@dataclass(frozen=True, slots=True)
class AllowedFast(_Index):
    pass


@dataclass(frozen=True, slots=True)
class _Block(Event):
    index: int
    begin: int
    length: int

    def __post_init__(self) -> None:
        _u32("index", self.index)
        _u32("begin", self.begin)
        _u32("length", self.length)

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.index, self.begin, self.length)


@dataclass(frozen=True, slots=True)
class Request(_Block):
    pass


@dataclass(frozen=True, slots=True)
class Cancel(_Block):
    pass


@dataclass(frozen=True, slots=True)
class Reject(_Block):
    pass


@dataclass(frozen=True, slots=True)
class Bitfield(Event):
    """The pieces a peer has, most significant bit first (BEP 3)."""
    bits: bytes

    def __post_init__(self) -> None:
        if not isinstance(self.bits, (bytes, memoryview)):
            raise LocalProtocolError("bitfield must be bytes")

    def has(self, index: int) -> bool:
        i = index >> 3
        return i < len(self.bits) and bool(self.bits[i] & (0x80 >> (index & 7)))

    def indices(self) -> list[int]:
        return [i * 8 + b for i, byte in enumerate(bytes(self.bits)) if byte
                for b in range(8) if byte & (0x80 >> b)]

    @staticmethod
    def from_indices(indices: Any, num_pieces: int) -> "Bitfield":
        out = bytearray((num_pieces + 7) // 8)
        for i in indices:
            if not 0 <= i < num_pieces:
                raise LocalProtocolError(f"piece {i} outside a torrent of {num_pieces}")
            out[i >> 3] |= 0x80 >> (i & 7)
        return Bitfield(bytes(out))


@dataclass(frozen=True, slots=True)
class Piece(Event):
    """A block of data.  ``data`` is a memoryview into received bytes (or
    whatever bytes-like the caller sends); it is not copied by the codec."""
    index: int
    begin: int
    data: Union[bytes, memoryview] = field(repr=False)

    def __post_init__(self) -> None:
        _u32("index", self.index)
        _u32("begin", self.begin)
        if not isinstance(self.data, (bytes, memoryview, bytearray)):
            raise LocalProtocolError("piece data must be bytes-like")
        if not 0 < len(self.data) <= BLOCK_SIZE:
            raise LocalProtocolError(f"piece data of {len(self.data)} bytes; blocks are "
                                     f"1..{BLOCK_SIZE}")

    @property
    def key(self) -> tuple[int, int, int]:
        return (self.index, self.begin, len(self.data))


@dataclass(frozen=True, slots=True)
class Port(Event):
    """The peer's DHT port (BEP 5)."""
    port: int

    def __post_init__(self) -> None:
        if type(self.port) is not int or not 0 <= self.port < 65536:
            raise LocalProtocolError(f"port must be in [0, 65536), not {self.port!r}")


@dataclass(frozen=True, slots=True)
class Extended(Event):
    """An extension message (BEP 10) other than the handshake.  On receive,
    ``ext_id`` is the id *we* assigned and ``name`` our name for it; on
    send, give ``name`` and the core fills in the peer's id."""
    ext_id: int
    payload: Union[bytes, memoryview] = field(repr=False)
    name: str = ""

    def __post_init__(self) -> None:
        if type(self.ext_id) is not int or not 0 <= self.ext_id < 256:
            raise LocalProtocolError(f"extended id must be in [0, 256), not {self.ext_id!r}")
        if len(self.payload) > MAX_EXTENDED_LEN:
            raise LocalProtocolError(f"extended payload of {len(self.payload)} bytes exceeds "
                                     f"{MAX_EXTENDED_LEN}")


@dataclass(frozen=True, slots=True)
class ExtensionHandshake(Event):
    """The BEP 10 handshake (extended message 0).  ``m`` maps extension
    names to the sender's ids (0 = disabled); ``extra`` keeps every other
    key as received, so an extension plug-in can read its own."""
    m: Mapping[str, int] = field(default_factory=dict)
    v: str | None = None
    p: int | None = None
    reqq: int | None = None
    yourip: bytes | None = None
    metadata_size: int | None = None
    extra: Mapping[bytes, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, ext_id in self.m.items():
            if not isinstance(name, str) or type(ext_id) is not int or not 0 <= ext_id < 256:
                raise LocalProtocolError(f"extension {name!r}: id {ext_id!r} not in [0, 256)")
        if self.p is not None and not 0 < self.p < 65536:
            raise LocalProtocolError(f"p (listen port) {self.p} out of range")
        if self.reqq is not None and not 0 < self.reqq < 1 << 31:
            raise LocalProtocolError(f"reqq {self.reqq} out of range")
        if self.yourip is not None and len(self.yourip) not in (4, 16):
            raise LocalProtocolError("yourip must be 4 or 16 bytes")
        if self.metadata_size is not None and self.metadata_size < 0:
            raise LocalProtocolError("metadata_size must not be negative")

    @property
    def yourip_address(self) -> str | None:
        """``yourip`` as text: the address the peer sees us at (a vote for
        our external address)."""
        return None if self.yourip is None else str(ipaddress.ip_address(self.yourip))

    def to_payload(self) -> bytes:
        d: dict[bytes, Any] = dict(self.extra)
        d[b"m"] = {k.encode(): v for k, v in self.m.items()}
        for key, val in ((b"v", self.v.encode() if self.v is not None else None),
                         (b"p", self.p), (b"reqq", self.reqq), (b"yourip", self.yourip),
                         (b"metadata_size", self.metadata_size)):
            if val is not None:
                d[key] = val
        return encode(d)

    @staticmethod
    def from_payload_untrusted(payload: bytes | memoryview) -> "ExtensionHandshake":
        try:
            d = decode_untrusted(bytes(payload), max_size=MAX_EXTENDED_LEN)
        except BencodeError as exc:
            raise WireError(Violation.BAD_EXTENDED, f"extension handshake: {exc}") from None
        if type(d) is not dict:
            raise WireError(Violation.BAD_EXTENDED, "extension handshake is not a dictionary")
        m_raw = d.pop(b"m", {})
        if type(m_raw) is not dict:
            raise WireError(Violation.BAD_EXTENDED, "extension handshake: m is not a dictionary")
        m: dict[str, int] = {}
        for k, v in m_raw.items():
            # Ids beyond a byte or names that are not text cannot be used;
            # skipping them (not disconnecting) is what libtorrent does.
            if type(v) is int and 0 <= v < 256:
                try:
                    m[k.decode()] = v
                except UnicodeDecodeError:
                    pass

        def take(key: bytes, kind: type, ok: Any) -> Any:
            val = d.pop(key, None)
            return val if type(val) is kind and ok(val) else None

        v = take(b"v", bytes, lambda x: True)
        return ExtensionHandshake(
            m=m, v=None if v is None else v.decode("utf-8", "replace"),
            p=take(b"p", int, lambda x: 0 < x < 65536),
            reqq=take(b"reqq", int, lambda x: 0 < x < 1 << 31),
            yourip=take(b"yourip", bytes, lambda x: len(x) in (4, 16)),
            metadata_size=take(b"metadata_size", int, lambda x: x >= 0),
            extra=d)


@dataclass(frozen=True, slots=True)
class UnknownMessage(Event):
    """A message id we do not speak (e.g. BEP 52's hash messages): passed
    up, not a violation, as BEP 3 lets clients add messages."""
    msg_id: int
    payload: Union[bytes, memoryview] = field(repr=False)


Message = Union[KeepAlive, Choke, Unchoke, Interested, NotInterested, Have, Bitfield, Request,
                Piece, Cancel, Port, Suggest, HaveAll, HaveNone, Reject, AllowedFast, Extended,
                ExtensionHandshake, UnknownMessage]

_EMPTY: dict[type, int] = {Choke: 0, Unchoke: 1, Interested: 2, NotInterested: 3,
                           HaveAll: 14, HaveNone: 15}
_INDEX: dict[type, int] = {Have: 4, Suggest: 13, AllowedFast: 17}
_BLOCK: dict[type, int] = {Request: 6, Cancel: 8, Reject: 16}
_EMPTY_BY_ID = {v: k for k, v in _EMPTY.items()}
_INDEX_BY_ID = {v: k for k, v in _INDEX.items()}
_BLOCK_BY_ID = {v: k for k, v in _BLOCK.items()}
_L4 = struct.Struct(">I")
_L4B = struct.Struct(">IB")
_IDX = struct.Struct(">IBI")
_BLK = struct.Struct(">IBIII")


def encode_message(msg: Message) -> list[bytes | memoryview]:
    """The wire form of ``msg`` as a list of chunks (a piece's data is not
    copied; join them, or hand them to a vectored write)."""
    t = type(msg)
    if t is Piece:
        assert isinstance(msg, Piece)
        return [_IDX.pack(9 + len(msg.data), 7, msg.index) + _L4.pack(msg.begin), msg.data]
    if t in _BLOCK:
        return [_BLK.pack(13, _BLOCK[t], msg.index, msg.begin, msg.length)]  # type: ignore[union-attr]
    if t in _INDEX:
        return [_IDX.pack(5, _INDEX[t], msg.index)]  # type: ignore[union-attr]
    if t in _EMPTY:
        return [_L4B.pack(1, _EMPTY[t])]
    if t is KeepAlive:
        return [bytes(4)]
    if t is Bitfield:
        return [_L4B.pack(1 + len(msg.bits), 5), bytes(msg.bits)]  # type: ignore[union-attr]
    if t is Port:
        return [_L4B.pack(3, 9) + struct.pack(">H", msg.port)]  # type: ignore[union-attr]
    if t is ExtensionHandshake:
        body = msg.to_payload()  # type: ignore[union-attr]
        return [_L4B.pack(2 + len(body), 20) + b"\x00", body]
    if t is Extended:
        assert isinstance(msg, Extended)
        return [_L4B.pack(2 + len(msg.payload), 20) + bytes((msg.ext_id,)), msg.payload]
    if t is UnknownMessage:
        assert isinstance(msg, UnknownMessage)
        _u32("msg_id", msg.msg_id)
        return [_L4B.pack(1 + len(msg.payload), msg.msg_id), msg.payload]
    raise LocalProtocolError(f"{t.__name__} is not a peer-wire message")


def encode_handshake(hs: Handshake) -> bytes:
    return PROTOCOL + hs.reserved + hs.infohash + hs.peer_id


def parse_handshake_untrusted(data: bytes | memoryview) -> Handshake:
    """The 68-byte handshake; WireError(BAD_HANDSHAKE) for anything else
    (a different protocol string, e.g. an encrypted MSE stream)."""
    if len(data) != HANDSHAKE_LEN or bytes(data[:20]) != PROTOCOL:
        raise WireError(Violation.BAD_HANDSHAKE, f"not a BitTorrent handshake: "
                        f"{bytes(data[:20])!r}")
    return Handshake(bytes(data[28:48]), bytes(data[48:68]), bytes(data[20:28]))


def decode_message_untrusted(body: memoryview) -> Message:
    """One message from its body (the bytes after the length prefix).

    Checks sizes only; what the indices mean against a torrent, and which
    messages are allowed now, is the core's job."""
    n = len(body)
    if n == 0:
        return KeepAlive()
    mid = body[0]
    if mid == 7:
        if n < 10 or n > 9 + BLOCK_SIZE:
            raise WireError(Violation.BAD_LENGTH, f"piece message of {n} bytes")
        index, begin = struct.unpack_from(">II", body, 1)
        return Piece(index, begin, body[9:])
    if mid in _BLOCK_BY_ID:
        if n != 13:
            raise WireError(Violation.BAD_LENGTH, f"{_BLOCK_BY_ID[mid].__name__} of {n} bytes")
        index, begin, length = struct.unpack_from(">III", body, 1)
        return _BLOCK_BY_ID[mid](index, begin, length)
    if mid in _INDEX_BY_ID:
        if n != 5:
            raise WireError(Violation.BAD_LENGTH, f"{_INDEX_BY_ID[mid].__name__} of {n} bytes")
        return _INDEX_BY_ID[mid](_L4.unpack_from(body, 1)[0])
    if mid in _EMPTY_BY_ID:
        if n != 1:
            raise WireError(Violation.BAD_LENGTH, f"{_EMPTY_BY_ID[mid].__name__} of {n} bytes")
        return _EMPTY_BY_ID[mid]()
    if mid == 5:
        return Bitfield(bytes(body[1:]))
    if mid == 9:
        if n != 3:
            raise WireError(Violation.BAD_LENGTH, f"port message of {n} bytes")
        return Port(struct.unpack_from(">H", body, 1)[0])
    if mid == 20:
        if n < 2:
            raise WireError(Violation.BAD_LENGTH, "extended message without an id")
        if n - 2 > MAX_EXTENDED_LEN:
            raise WireError(Violation.MESSAGE_TOO_LONG, f"extended message of {n} bytes")
        if body[1] == 0:
            return ExtensionHandshake.from_payload_untrusted(body[2:])
        return Extended(body[1], body[2:])
    return UnknownMessage(mid, body[1:])


def allowed_fast_set(ip: str, infohash: bytes, num_pieces: int, k: int = 10) -> list[int]:
    """The canonical allowed-fast set for a peer at ``ip`` (BEP 6): SHA-1
    chained over the /24 of the IPv4 address and the infohash, each digest
    giving five 32-bit candidates taken modulo the piece count.

    BEP 6 defines only IPv4; for IPv6 we use the first 12 bytes (/96
    masking the rest), as no interoperable rule exists: the set is ours to
    choose, the peer only learns it from our AllowedFast messages."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    if isinstance(addr, ipaddress.IPv4Address):
        x = (int(addr) & 0xFFFFFF00).to_bytes(4, "big")
    else:
        x = addr.packed[:12] + bytes(4)
    k = min(k, num_pieces)
    out: list[int] = []
    x = x + bytes(infohash)
    while len(out) < k:
        x = hashlib.sha1(x).digest()
        for i in range(5):
            if len(out) >= k:
                break
            index = _L4.unpack_from(x, 4 * i)[0] % num_pieces
            if index not in out:
                out.append(index)
    return out
