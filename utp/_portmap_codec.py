"""NAT-PMP (RFC 6886) and PCP (RFC 6887) messages, sans-I/O.

Why here and not a library: both protocols are a handful of fixed-layout
datagrams to the gateway's port 5351; the PyPI packages for them are
unmaintained or blocking, and what matters (nonce checks, epoch checks,
version fallback, lifetimes) is easier to get right and test as pure
functions.  :mod:`utp._portmap` does the I/O.

What it is: encoders for the requests a client sends (NAT-PMP external
address and MAP for UDP/TCP; PCP MAP), decoders for the answers
(``*_untrusted``: the bytes come from the network, and any input either
decodes or raises :class:`PortMapProtocolError`), the result codes with a
message each, the retransmission schedules both RFCs give, and the epoch
check that tells a rebooted gateway (which forgot our mappings) from a
live one.

Announcements: a gateway that restarts or whose external address changes
multicasts a NAT-PMP external address answer (RFC 6886 section 3.2.1)
and a PCP ANNOUNCE answer (RFC 6887 section 14.1.3) to 224.0.0.1:5350;
:func:`decode_announcement_untrusted` reads either.

What it is not: a server, PCP's PEER opcode or options (THIRD_PARTY,
PREFER_FAILURE, FILTER), or IPv6 mappings.
"""

from __future__ import annotations

import ipaddress
import random
import struct
from dataclasses import dataclass
from typing import Iterator

__all__ = [
    "SERVER_PORT", "NATPMP_VERSION", "PCP_VERSION", "PortMapProtocolError",
    "NatPmpExternalAddress", "NatPmpMapping", "PcpMapping", "encode_natpmp_external_address",
    "encode_natpmp_map", "decode_natpmp_untrusted", "encode_pcp_map", "decode_pcp_untrusted",
    "natpmp_retransmit_delays", "pcp_retransmit_delays", "epoch_went_back",
    "NATPMP_RESULTS", "PCP_RESULTS", "VersionNotSupported", "ANNOUNCE_GROUP", "ANNOUNCE_PORT",
    "Announcement", "decode_announcement_untrusted",
]

SERVER_PORT = 5351
# Where gateways multicast restart and address-change announcements.
ANNOUNCE_GROUP = "224.0.0.1"
ANNOUNCE_PORT = 5350
NATPMP_VERSION = 0
PCP_VERSION = 2
IPPROTO_TCP = 6
IPPROTO_UDP = 17
_PROTO_NUMBERS = {"udp": IPPROTO_UDP, "tcp": IPPROTO_TCP}

# RFC 6886 section 3.5.
NATPMP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized or refused (the gateway has port mapping turned off or denies this client)",
    3: "network failure (the gateway has no external address yet, e.g. no DHCP lease)",
    4: "out of resources (the gateway cannot create more mappings)",
    5: "unsupported opcode",
}

# RFC 6887 section 7.4.
PCP_RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized (the server refuses this client or mapping)",
    3: "malformed request",
    4: "unsupported opcode",
    5: "unsupported option",
    6: "malformed option",
    7: "network failure (the server has no external address, or cannot reach it)",
    8: "no resources (the server cannot create more mappings)",
    9: "unsupported protocol",
    10: "user exceeded quota",
    11: "cannot provide the suggested external address or port",
    12: "address mismatch (a NAT between us and the PCP server changed our source address)",
    13: "excessive remote peers",
}


class PortMapProtocolError(ValueError):
    """A datagram from the gateway that is not a well-formed answer (the
    decoders raise only this, for any input)."""


class VersionNotSupported(PortMapProtocolError):
    """The gateway answered with "unsupported version": it speaks the other
    protocol (a NAT-PMP-only gateway answers a PCP request so, RFC 6887
    section 9), or a version named in :attr:`server_version`."""

    def __init__(self, message: str, server_version: int) -> None:
        super().__init__(message)
        self.server_version = server_version


@dataclass(frozen=True, slots=True)
class NatPmpExternalAddress:
    """A decoded NAT-PMP external address answer."""

    result: int
    epoch: int
    address: str


@dataclass(frozen=True, slots=True)
class NatPmpMapping:
    """A decoded NAT-PMP MAP answer (``protocol`` is "udp" or "tcp")."""

    result: int
    epoch: int
    protocol: str
    internal_port: int
    external_port: int
    lifetime: int


@dataclass(frozen=True, slots=True)
class PcpMapping:
    """A decoded PCP MAP answer; ``external_ip`` is an IPv4 address for
    IPv4-mapped answers, else the IPv6 text."""

    result: int
    lifetime: int
    epoch: int
    nonce: bytes
    protocol: str
    internal_port: int
    external_port: int
    external_ip: str


@dataclass(frozen=True, slots=True)
class Announcement:
    """A gateway's unsolicited announcement: ``protocol`` "natpmp" (an
    external address answer, with ``address``) or "pcp" (ANNOUNCE,
    ``address`` empty); ``epoch`` the gateway's seconds since it (re)started."""

    protocol: str
    epoch: int
    address: str = ""


def decode_announcement_untrusted(data: bytes) -> Announcement:
    """Decode what arrives on 224.0.0.1:5350: a successful NAT-PMP external
    address answer or PCP ANNOUNCE answer; anything else raises
    :class:`PortMapProtocolError`."""
    if len(data) >= 2 and data[0] == NATPMP_VERSION:
        ans = decode_natpmp_untrusted(data)
        if not isinstance(ans, NatPmpExternalAddress) or ans.result:
            raise PortMapProtocolError("a NAT-PMP datagram that is no external address announcement")
        return Announcement("natpmp", ans.epoch, ans.address)
    if len(data) < 24 or len(data) % 4 or len(data) > 1100:
        raise PortMapProtocolError(f"{len(data)} bytes are no PCP ANNOUNCE (24 or more, a multiple of 4)")
    version, op, result = data[0], data[1], data[3]
    if version != PCP_VERSION or op != 0x80 or result != 0:
        raise PortMapProtocolError(f"no successful PCP ANNOUNCE answer (version {version}, "
                                   f"opcode {op:#x}, result {result})")
    epoch, = struct.unpack_from(">I", data, 8)
    return Announcement("pcp", epoch)


def result_message(protocol: str, code: int) -> str:
    """The text for a NAT-PMP or PCP result code."""
    table = PCP_RESULTS if protocol == "pcp" else NATPMP_RESULTS
    return f"result {code}: {table.get(code, 'unknown result code')}"


def _check_port(name: str, port: int) -> None:
    if not 0 <= port <= 0xFFFF:
        raise ValueError(f"{name} must be 0..65535, not {port}")


def _check_lifetime(lifetime: int) -> None:
    if not 0 <= lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime must be 0..2**32-1 seconds, not {lifetime}")


def _proto_number(protocol: str) -> int:
    try:
        return _PROTO_NUMBERS[protocol]
    except KeyError:
        raise ValueError(f"protocol must be 'udp' or 'tcp', not {protocol!r}") from None


# ---- NAT-PMP -------------------------------------------------------------------------

def encode_natpmp_external_address() -> bytes:
    """Opcode 0: what is the gateway's external IPv4 address?"""
    return bytes((NATPMP_VERSION, 0))


def encode_natpmp_map(protocol: str, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """Opcode 1 (UDP) or 2 (TCP).  ``lifetime`` 0 deletes the mapping (and
    then RFC 6886 section 3.4 wants ``external_port`` 0 too)."""
    _check_port("internal_port", internal_port)
    _check_port("external_port", external_port)
    _check_lifetime(lifetime)
    op = 1 if _proto_number(protocol) == IPPROTO_UDP else 2
    return struct.pack(">BBHHHI", NATPMP_VERSION, op, 0, internal_port, external_port, lifetime)


def decode_natpmp_untrusted(data: bytes) -> NatPmpExternalAddress | NatPmpMapping:
    """Decode a NAT-PMP answer.  Raises :class:`VersionNotSupported` for
    result 1 (whatever the layout), :class:`PortMapProtocolError` for
    anything that is not an answer."""
    if len(data) < 4:
        raise PortMapProtocolError(f"NAT-PMP answer too short ({len(data)} bytes)")
    version, op, result = struct.unpack_from(">BBH", data)
    if op < 128:
        raise PortMapProtocolError(f"NAT-PMP datagram with opcode {op} is a request, not an answer")
    if result == 1:
        raise VersionNotSupported("the gateway does not support NAT-PMP version "
                                  f"{NATPMP_VERSION} ({version} in its answer)", version)
    if version != NATPMP_VERSION:
        raise PortMapProtocolError(f"NAT-PMP answer has version {version}, expected 0")
    op -= 128
    if op == 0:
        if len(data) < 12:
            raise PortMapProtocolError(f"NAT-PMP external address answer too short ({len(data)} bytes)")
        epoch, = struct.unpack_from(">I", data, 4)
        return NatPmpExternalAddress(result, epoch, str(ipaddress.IPv4Address(data[8:12])))
    if op in (1, 2):
        if len(data) < 16:
            raise PortMapProtocolError(f"NAT-PMP mapping answer too short ({len(data)} bytes)")
        epoch, internal, external, lifetime = struct.unpack_from(">IHHI", data, 4)
        return NatPmpMapping(result, epoch, "udp" if op == 1 else "tcp", internal, external, lifetime)
    raise PortMapProtocolError(f"NAT-PMP answer to unknown opcode {op}")


# ---- PCP ------------------------------------------------------------------------------

def _ip16(address: str) -> bytes:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv4Address):
        return bytes(10) + b"\xff\xff" + ip.packed
    return ip.packed


def _ip_text_untrusted(raw: bytes) -> str:
    ip = ipaddress.IPv6Address(raw)
    return str(ip.ipv4_mapped) if ip.ipv4_mapped is not None else str(ip)


def encode_pcp_map(*, nonce: bytes, protocol: str, internal_port: int, client_ip: str,
                   lifetime: int, external_port: int = 0, external_ip: str = "0.0.0.0") -> bytes:
    """A PCP MAP request (RFC 6887 sections 7.1 and 11.1).  ``client_ip``
    must be the source address the server will see (it answers
    ADDRESS_MISMATCH otherwise); the same ``nonce`` must be used to renew
    and to delete (lifetime 0) the mapping."""
    if len(nonce) != 12:
        raise ValueError("a PCP nonce is 12 bytes")
    _check_port("internal_port", internal_port)
    _check_port("external_port", external_port)
    _check_lifetime(lifetime)
    header = struct.pack(">BBHI", PCP_VERSION, 1, 0, lifetime) + _ip16(client_ip)
    body = nonce + struct.pack(">B3xHH", _proto_number(protocol), internal_port, external_port)
    return header + body + _ip16(external_ip)


def decode_pcp_untrusted(data: bytes) -> PcpMapping:
    """Decode a PCP answer to MAP.  Raises :class:`VersionNotSupported` for
    UNSUPP_VERSION (also the NAT-PMP-shaped one a NAT-PMP-only gateway
    sends), :class:`PortMapProtocolError` for anything else that is not a
    MAP answer."""
    if len(data) < 4:
        raise PortMapProtocolError(f"PCP answer too short ({len(data)} bytes)")
    version, op = data[0], data[1]
    if version == NATPMP_VERSION:
        # RFC 6887 section 9: a NAT-PMP server answers version 2 with its
        # own "unsupported version" (result 1) and version 0.
        if op >= 128 and struct.unpack_from(">H", data, 2)[0] == 1:
            raise VersionNotSupported("the gateway speaks NAT-PMP, not PCP", 0)
        raise PortMapProtocolError("a NAT-PMP datagram where a PCP answer was expected")
    if not op & 0x80:
        raise PortMapProtocolError("PCP datagram without the R bit is a request, not an answer")
    result = data[3]
    if result == 1:
        raise VersionNotSupported(f"the PCP server does not support version {PCP_VERSION} "
                                  f"(it speaks {version})", version)
    if version != PCP_VERSION:
        raise PortMapProtocolError(f"PCP answer has version {version}, expected {PCP_VERSION}")
    if len(data) % 4 or len(data) > 1100:
        raise PortMapProtocolError(f"PCP answer of {len(data)} bytes (must be a multiple of 4, "
                                   f"at most 1100)")
    if op & 0x7F != 1:
        raise PortMapProtocolError(f"PCP answer to opcode {op & 0x7F}, not MAP")
    if len(data) < 60:
        raise PortMapProtocolError(f"PCP MAP answer too short ({len(data)} bytes)")
    lifetime, epoch = struct.unpack_from(">II", data, 4)
    nonce = bytes(data[24:36])
    proto, internal, external = struct.unpack_from(">B3xHH", data, 36)
    names = {v: k for k, v in _PROTO_NUMBERS.items()}
    return PcpMapping(result, lifetime, epoch, nonce, names.get(proto, str(proto)),
                      internal, external, _ip_text_untrusted(bytes(data[44:60])))


# ---- timing ---------------------------------------------------------------------------

def natpmp_retransmit_delays() -> Iterator[float]:
    """RFC 6886 section 3.1: wait 250 ms for the first answer, then double
    the wait after each resend, 9 sends in all (the last wait is 64 s)."""
    delay = 0.25
    for _ in range(9):
        yield delay
        delay *= 2


def pcp_retransmit_delays(rng: random.Random | None = None) -> Iterator[float]:
    """RFC 6887 section 8.1.1: IRT 3 s, each wait doubles with a random
    +-10 %, capped at MRT 1024 s, sent until the caller gives up."""
    rng = rng or random.Random()
    rt = 3.0 * (1 + rng.uniform(-0.1, 0.1))
    while True:
        yield rt
        rt = min(2 * rt, 1024.0) * (1 + rng.uniform(-0.1, 0.1))


def epoch_went_back(prev_epoch: int, prev_time: float, epoch: int, now: float) -> bool:
    """RFC 6886 section 3.6 and RFC 6887 section 8.5: True when the
    gateway's epoch is less than the previous one plus 7/8 of the time that
    passed (minus 2 s of slack), i.e. it restarted and lost our mappings."""
    elapsed = max(0.0, now - prev_time)
    return epoch + 2 < prev_epoch + elapsed * 7 / 8 or epoch < prev_epoch - 1
