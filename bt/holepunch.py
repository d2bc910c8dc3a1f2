"""The holepunch extension (BEP 55, extension ``ut_holepunch``), sans-I/O.

Three roles, all over BEP 10 extended messages on existing connections:

- *initiator*: a peer X cannot be reached directly, and a connected peer R
  said (PEX, flag 0x08 or simply in its added list) that it is connected
  to X: send ``rendezvous(X)`` to R;
- *relay* (R): on ``rendezvous(X)`` from I, when X is connected to us and
  supports the extension, send ``connect(X)`` to I and ``connect(I)`` to X;
  otherwise answer ``error(X, code)``: :data:`ERR_NO_SUCH_PEER` (1, X is
  not a usable endpoint), :data:`ERR_NOT_CONNECTED` (2),
  :data:`ERR_NO_SUPPORT` (3, X lacks ut_holepunch), :data:`ERR_NO_SELF`
  (4, X is I itself);
- *target* (and the initiator too): on ``connect(Y)``, both sides start
  connecting to each other at the same moment, which opens both NATs
  (here: :func:`utp.punch`'s simultaneous connect on the shared socket).

Payload (binary, big-endian): ``msg_type`` (1 byte: 0 rendezvous, 1
connect, 2 error), ``addr_type`` (1 byte: 0 IPv4, 1 IPv6), the address (4
or 16 bytes), the port (2 bytes), and for ``error`` the error code (4
bytes).  Some implementations send the 4-byte code with every type (0 for
no error): accepted; any other length is a violation
(:class:`HolepunchError`).
"""

from __future__ import annotations

import enum
import ipaddress
import struct
from dataclasses import dataclass

from _utpkit.errors import RemoteProtocolError

__all__ = ["HolepunchError", "HolepunchMessage", "MsgType", "encode_holepunch",
           "parse_holepunch_untrusted", "relay_error", "EXTENSION", "ERR_NO_SUCH_PEER",
           "ERR_NOT_CONNECTED", "ERR_NO_SUPPORT", "ERR_NO_SELF", "ERROR_NAMES"]

EXTENSION = "ut_holepunch"
ERR_NO_SUCH_PEER = 1
ERR_NOT_CONNECTED = 2
ERR_NO_SUPPORT = 3
ERR_NO_SELF = 4
ERROR_NAMES = {ERR_NO_SUCH_PEER: "NoSuchPeer", ERR_NOT_CONNECTED: "NotConnected",
               ERR_NO_SUPPORT: "NoSupport", ERR_NO_SELF: "NoSelf"}


class MsgType(enum.IntEnum):
    RENDEZVOUS = 0
    CONNECT = 1
    ERROR = 2


class HolepunchError(RemoteProtocolError):
    """A ut_holepunch message broke BEP 55; ``reason`` is a counter key."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"ut_holepunch: {detail}")
        self.reason = reason


@dataclass(frozen=True, slots=True)
class HolepunchMessage:
    msg_type: MsgType
    addr: tuple[str, int]
    error: int = 0


def encode_holepunch(msg: HolepunchMessage) -> bytes:
    ip = ipaddress.ip_address(msg.addr[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    port = int(msg.addr[1])
    if not 0 <= port < 65536:
        raise ValueError(f"port {port} out of range")
    out = struct.pack(">BB", int(msg.msg_type), 0 if ip.version == 4 else 1) + ip.packed \
        + struct.pack(">H", port)
    if msg.msg_type is MsgType.ERROR:
        out += struct.pack(">I", msg.error)
    return out


def parse_holepunch_untrusted(payload: bytes | memoryview) -> HolepunchMessage:
    """Parse a received payload; HolepunchError for anything malformed."""
    data = bytes(payload)
    if len(data) < 2:
        raise HolepunchError("short", f"{len(data)} bytes, need at least 2")
    try:
        msg_type = MsgType(data[0])
    except ValueError:
        raise HolepunchError("bad_type", f"unknown message type {data[0]}") from None
    if data[1] not in (0, 1):
        raise HolepunchError("bad_addr_type", f"unknown address type {data[1]}")
    alen = 4 if data[1] == 0 else 16
    end = 2 + alen + 2
    rest = len(data) - end
    if rest < 0:
        raise HolepunchError("short", f"{len(data)} bytes for a {alen}-byte address")
    if msg_type is MsgType.ERROR and rest != 4:
        raise HolepunchError("bad_length", f"error message with {rest} bytes after the address "
                                           f"(the code needs 4)")
    if rest not in (0, 4):
        raise HolepunchError("bad_length", f"{rest} bytes after the address")
    ip = ipaddress.ip_address(data[2:2 + alen])
    port = struct.unpack(">H", data[2 + alen:end])[0]
    code = struct.unpack(">I", data[end:end + 4])[0] if rest == 4 else 0
    if msg_type is not MsgType.ERROR:
        code = 0
    return HolepunchMessage(msg_type, (str(ip), port), code)


def relay_error(target: tuple[str, int], requester: tuple[str, int], *, connected: bool,
                supports: bool) -> int:
    """The relay's answer to ``rendezvous(target)`` from ``requester``: 0
    (forward ``connect`` to both) or an error code.  ``connected``: the
    target is connected to us; ``supports``: its extension handshake named
    ut_holepunch."""
    try:
        ip = ipaddress.ip_address(target[0])
    except ValueError:
        return ERR_NO_SUCH_PEER
    if target[1] == 0 or ip.is_unspecified or ip.is_multicast:
        return ERR_NO_SUCH_PEER
    if _same(target, requester):
        return ERR_NO_SELF
    if not connected:
        return ERR_NOT_CONNECTED
    if not supports:
        return ERR_NO_SUPPORT
    return 0


def _same(a: tuple[str, int], b: tuple[str, int]) -> bool:
    try:
        ia, ib = ipaddress.ip_address(a[0]), ipaddress.ip_address(b[0])
    except ValueError:
        return False
    ia = ia.ipv4_mapped or ia if ia.version == 6 else ia
    ib = ib.ipv4_mapped or ib if ib.version == 6 else ib
    return ia == ib and int(a[1]) == int(b[1])
