"""Connecting with timeout and retry (DESIGN.md, "Connecting across NATs").

Each attempt is a fresh uTP connection with a new connection id.  Behind a
NAT the first SYNs of an attempt open our own mapping; when the peer's side
is not yet open they are lost, and a later attempt gets through.  Retrying
with new connections instead of one long SYN schedule also means a
connection id that some middlebox has seen refused is never reused.
"""

from __future__ import annotations

import errno
import ipaddress
import math
from typing import TYPE_CHECKING, Any

import trio

from _utpkit.addr import normalize_ip

from . import _utp
from ._errors import describe
from ._utp import EventKind
from ._stream import UTPStream, _format_peer

if TYPE_CHECKING:  # pragma: no cover
    from ._endpoint import Endpoint

__all__ = ["connect_with_retry", "check_address"]


def check_address(addr: Any) -> tuple[Any, ...]:
    """Validates a ``(host, port)`` or ``(host, port, flowinfo, scope_id)``
    tuple with a literal IP address; raises OSError naming what is wrong."""
    if not isinstance(addr, tuple) or len(addr) not in (2, 4):
        raise OSError(f"expected a (host, port) address tuple, not {addr!r}")
    host, port = addr[0], addr[1]
    if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
        raise OSError(f"bad port {port!r} in {addr!r}: expected 1..65535")
    try:
        ipaddress.ip_address(str(host).split("%", 1)[0])
    except ValueError:
        raise OSError(f"{host!r} is not a literal IP address; resolve names first "
                      f"(utp.open_utp_stream does)") from None
    return addr


def check_family(local: tuple[Any, ...], addr: tuple[Any, ...]) -> None:
    """Refuse at once what a socket bound to ``local`` cannot reach: an
    IPv6 peer from an IPv4 socket, an IPv4 peer from an IPv6 socket bound
    to a specific address (only one bound to ``::`` is dual-stack).
    Otherwise the datagrams are silently undeliverable and the connect
    would wait out its whole timeout."""
    try:
        here, there = ipaddress.ip_address(str(local[0]).split("%", 1)[0]), normalize_ip(addr[0])
    except (ValueError, TypeError, IndexError):
        return
    if here.version == 4 and there.version == 6:
        why = "an IPv4 socket cannot send to an IPv6 address"
    elif here.version == 6 and there.version == 4 and not here.is_unspecified:
        why = "an IPv6 socket bound to a specific address cannot send to an IPv4 address"
    else:
        return
    raise OSError(errno.EAFNOSUPPORT,
                  f"cannot connect to {_format_peer(addr)} from an Endpoint bound to "
                  f"{_format_peer(local)}: the address families differ ({why}); open the "
                  f"Endpoint on an address of the peer's family, or on '::' (dual-stack)")


# The events that end a connection attempt.
_FINAL = (EventKind.CONNECT, EventKind.ERROR, EventKind.DESTROYED)


async def _attempt(ep: Endpoint, addr: tuple[Any, ...], limit: float) -> UTPStream | int | None:
    """One connection attempt: a stream, an engine error code, or None when
    ``limit`` seconds passed without an answer."""
    events: list[tuple[EventKind, Any]] = []
    lot = trio.lowlevel.ParkingLot()

    def waiter(kind: EventKind, arg: Any) -> None:
        events.append((kind, arg))
        lot.unpark_all()

    sock = ep.open_engine_socket(addr)
    sock.userdata = waiter
    connected = False
    try:
        ep.after_engine_call()  # the SYN leaves now
        with trio.move_on_after(limit):
            while not any(k in _FINAL for k, _ in events):
                await lot.park()
        for kind, arg in events:
            if kind is EventKind.CONNECT:
                connected = True
                return UTPStream(ep, sock, addr)
            if kind is EventKind.ERROR:
                return int(arg)
        return None
    finally:
        if not connected:
            # Timed out, failed or cancelled: leave nothing half-open.
            sock.userdata = None
            if not sock.destroyed and not ep.engine_closed:
                sock.close()
                ep.after_engine_call()


async def connect_with_retry(ep: Endpoint, addr: tuple[Any, ...], *, attempt_timeout: float,
                             timeout: float | None, deadline: float | None) -> UTPStream:
    addr = check_address(addr)
    check_family(ep.local_address, addr)
    if not attempt_timeout > 0:
        raise ValueError(f"attempt_timeout must be positive, not {attempt_timeout!r}")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")
    start = trio.current_time()
    end = math.inf
    if timeout is not None:
        end = start + timeout
    if deadline is not None:
        end = min(end, deadline)
    if end == math.inf:
        raise ValueError("connect needs a timeout or a deadline")
    peer = _format_peer(addr)
    attempts = 0
    while True:
        left = end - trio.current_time()
        if left <= 0:
            break
        attempts += 1
        result = await _attempt(ep, addr, min(attempt_timeout, left))
        if isinstance(result, UTPStream):
            return result
        if result == _utp.UTP_ECONNREFUSED:
            raise ConnectionRefusedError(f"uTP connection to {peer} refused: nothing accepts "
                                         f"connections there")
        if result is not None and result != _utp.UTP_ETIMEDOUT:
            raise OSError(describe(result, peer))
    elapsed = trio.current_time() - start
    raise TimeoutError(f"uTP connection to {peer} timed out: no answer to {attempts} "
                       f"attempt{'s' if attempts != 1 else ''} in {elapsed:.1f} s")
