"""Node ids, compact addresses (BEP 5, BEP 32), BEP 42 secure ids and the
KRPC message parser.  Pure functions; nothing here keeps state."""

from __future__ import annotations

import ipaddress
import socket
import struct
from dataclasses import dataclass, field
from typing import Any, Optional

from _utpkit.bencode import BencodeError, decode_untrusted, encode
from _utpkit.errors import RemoteProtocolError

__all__ = [
    "Addr", "ID_LEN", "distance", "family_of", "pack_addr", "unpack_addr_untrusted",
    "pack_nodes", "unpack_nodes_untrusted", "crc32c", "secure_id", "is_secure_id",
    "exempt_from_bep42", "Query", "Response", "Error", "KRPCError", "ProtocolError", "parse_untrusted",
    "ERROR_GENERIC", "ERROR_SERVER", "ERROR_PROTOCOL", "ERROR_METHOD",
]

Addr = tuple  # (host: str, port: int)
ID_LEN = 20

# BEP 5 error codes.
ERROR_GENERIC = 201
ERROR_SERVER = 202
ERROR_PROTOCOL = 203
ERROR_METHOD = 204


def distance(a: bytes, b: bytes) -> int:
    """The XOR metric of BEP 5 as an integer."""
    return int.from_bytes(a, "big") ^ int.from_bytes(b, "big")


def family_of(host: str) -> int:
    """4 or 6 (the address family of a literal IP address)."""
    return 6 if ":" in host else 4


def pack_addr(addr: Addr) -> bytes:
    """Compact ip:port: 6 bytes for IPv4, 18 for IPv6 (BEP 5, BEP 32)."""
    host, port = addr[0], addr[1]
    if ":" in host:
        return socket.inet_pton(socket.AF_INET6, host) + struct.pack(">H", port)
    return socket.inet_pton(socket.AF_INET, host) + struct.pack(">H", port)


def unpack_addr_untrusted(b: bytes) -> Optional[Addr]:
    """The inverse of pack_addr, or None for a length that is neither 6
    nor 18 or a port of 0."""
    if len(b) == 6:
        host = socket.inet_ntoa(b[:4])
    elif len(b) == 18:
        host = socket.inet_ntop(socket.AF_INET6, b[:16])
    else:
        return None
    port = struct.unpack(">H", b[-2:])[0]
    if port == 0:
        return None
    return (host, port)


def pack_nodes(nodes: list[tuple[bytes, Addr]]) -> bytes:
    return b"".join(nid + pack_addr(addr) for nid, addr in nodes)


def unpack_nodes_untrusted(b: bytes, family: int) -> list[tuple[bytes, Addr]]:
    """Compact node info: 26-byte (``nodes``) or 38-byte (``nodes6``)
    entries.  A length that is not a multiple is a protocol error."""
    size = 26 if family == 4 else 38
    if len(b) % size:
        raise ProtocolError(ERROR_PROTOCOL, f"nodes{'' if family == 4 else '6'} length {len(b)} is not a multiple of {size}")
    out = []
    for i in range(0, len(b), size):
        addr = unpack_addr_untrusted(b[i + 20:i + size])
        if addr is not None:
            out.append((b[i:i + 20], addr))
    return out


# ---- BEP 42 ---------------------------------------------------------------------------

def _crc32c_table() -> list[int]:
    poly = 0x82F63B78  # Castagnoli, reflected
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ poly if c & 1 else c >> 1
        table.append(c)
    return table


_CRC32C = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for byte in data:
        c = _CRC32C[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


_V4_MASK = bytes([0x03, 0x0F, 0x3F, 0xFF])
_V6_MASK = bytes([0x01, 0x03, 0x07, 0x0F, 0x1F, 0x3F, 0x7F, 0xFF])


def _bep42_prefix(host: str, r: int) -> int:
    if ":" in host:
        ip = socket.inet_pton(socket.AF_INET6, host)[:8]
        masked = bytearray(a & m for a, m in zip(ip, _V6_MASK))
    else:
        ip = socket.inet_pton(socket.AF_INET, host)
        masked = bytearray(a & m for a, m in zip(ip, _V4_MASK))
    masked[0] |= (r & 7) << 5
    return crc32c(bytes(masked))


def secure_id(host: str, rand: bytes) -> bytes:
    """A BEP 42 node id for external IP ``host``; ``rand`` supplies 20
    random bytes (the last one is the ``r`` of the BEP)."""
    r = rand[19]
    crc = _bep42_prefix(host, r)
    head = bytes([(crc >> 24) & 0xFF, (crc >> 16) & 0xFF, ((crc >> 8) & 0xF8) | (rand[2] & 7)])
    return head + rand[3:19] + bytes([r])


def exempt_from_bep42(host: str) -> bool:
    """BEP 42 exempts local networks: loopback, private, link-local."""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return True
    return ip.is_private or ip.is_loopback or ip.is_link_local or ip.is_reserved


def is_secure_id(node_id: bytes, host: str) -> bool:
    """True when ``node_id`` matches ``host`` under BEP 42 (first 21 bits)."""
    if exempt_from_bep42(host):
        return True
    crc = _bep42_prefix(host, node_id[19])
    want = crc >> 11
    got = int.from_bytes(node_id[:3], "big") >> 3
    return want == got


# ---- KRPC messages --------------------------------------------------------------------


class KRPCError(RemoteProtocolError):
    """A message we cannot act on (a :class:`RemoteProtocolError`).
    ``code`` is the KRPC error to answer with (203 or 204); ``tid`` is set
    when the message had one, so an error reply can be sent."""

    def __init__(self, code: int, message: str, tid: bytes | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.tid = tid


# The name this module used before the error family (_utpkit.errors); the
# core still raises and catches it under this name.
ProtocolError = KRPCError


@dataclass(frozen=True, slots=True)
class Query:
    tid: bytes
    method: bytes
    sender: bytes               # the querying node's id
    args: dict
    read_only: bool = False     # BEP 43
    version: bytes | None = None
    want: frozenset = frozenset()   # BEP 32: {4, 6}, empty when absent


@dataclass(frozen=True, slots=True)
class Response:
    tid: bytes
    sender: bytes
    values: dict                # the 'r' dictionary
    ip: Addr | None = None      # BEP 42: how the responder sees us
    version: bytes | None = None


@dataclass(frozen=True, slots=True)
class Error:
    tid: bytes
    code: int
    message: str
    ip: Addr | None = None


_KNOWN_QUERIES = {b"ping", b"find_node", b"get_peers", b"announce_peer"}


def _id_field(d: dict, key: bytes, tid: bytes) -> bytes:
    v = d.get(key)
    if not isinstance(v, bytes) or len(v) != ID_LEN:
        raise ProtocolError(ERROR_PROTOCOL, f"missing or malformed '{key.decode()}'", tid)
    return v


def parse_untrusted(data: bytes) -> Query | Response | Error:
    """Parse one KRPC datagram.  Raises ProtocolError (with ``tid`` when one
    could be read) for anything that is not a well-formed KRPC message; the
    arguments specific to each query are checked by the handler."""
    try:
        msg = decode_untrusted(data, max_size=4096)
    except BencodeError as exc:
        raise ProtocolError(ERROR_PROTOCOL, f"invalid bencode: {exc}") from None
    if not isinstance(msg, dict):
        raise ProtocolError(ERROR_PROTOCOL, "not a dictionary")
    tid = msg.get(b"t")
    if not isinstance(tid, bytes) or not 0 < len(tid) <= 16:
        raise ProtocolError(ERROR_PROTOCOL, "missing or malformed transaction id")
    y = msg.get(b"y")
    version = msg.get(b"v")
    if not isinstance(version, bytes) or len(version) > 16:
        version = None
    ip = None
    raw_ip = msg.get(b"ip")
    if isinstance(raw_ip, bytes):
        ip = unpack_addr_untrusted(raw_ip)
    if y == b"q":
        method = msg.get(b"q")
        args = msg.get(b"a")
        if not isinstance(method, bytes) or not isinstance(args, dict):
            raise ProtocolError(ERROR_PROTOCOL, "query without 'q' or 'a'", tid)
        sender = _id_field(args, b"id", tid)
        if method not in _KNOWN_QUERIES:
            raise ProtocolError(ERROR_METHOD, "Method Unknown", tid)
        ro = msg.get(b"ro") == 1
        want = set()
        w = args.get(b"want")
        if isinstance(w, list):
            for x in w:
                if x == b"n4":
                    want.add(4)
                elif x == b"n6":
                    want.add(6)
        return Query(tid, method, sender, args, ro, version, frozenset(want))
    if y == b"r":
        r = msg.get(b"r")
        if not isinstance(r, dict):
            raise ProtocolError(ERROR_PROTOCOL, "response without 'r'", tid)
        sender = _id_field(r, b"id", tid)
        return Response(tid, sender, r, ip, version)
    if y == b"e":
        e = msg.get(b"e")
        code, text = ERROR_GENERIC, ""
        if isinstance(e, list) and e:
            if isinstance(e[0], int):
                code = e[0]
            if len(e) > 1 and isinstance(e[1], bytes):
                text = e[1][:200].decode("utf-8", "replace")
        return Error(tid, code, text, ip)
    raise ProtocolError(ERROR_PROTOCOL, "'y' is not q, r or e", tid)


def build_query(tid: bytes, method: bytes, args: dict, *, version: bytes, read_only: bool) -> bytes:
    msg: dict[bytes, Any] = {b"t": tid, b"y": b"q", b"q": method, b"a": args, b"v": version}
    if read_only:
        msg[b"ro"] = 1
    return encode(msg)


def build_response(tid: bytes, values: dict, *, version: bytes, ip: Addr | None) -> bytes:
    msg: dict[bytes, Any] = {b"t": tid, b"y": b"r", b"r": values, b"v": version}
    if ip is not None:
        msg[b"ip"] = pack_addr(ip)
    return encode(msg)


def build_error(tid: bytes, code: int, message: str, *, version: bytes, ip: Addr | None = None) -> bytes:
    msg: dict[bytes, Any] = {b"t": tid, b"y": b"e", b"e": [code, message.encode()], b"v": version}
    if ip is not None:
        msg[b"ip"] = pack_addr(ip)
    return encode(msg)
