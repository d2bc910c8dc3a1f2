"""Rendezvous: find the other peer by a shared key, then punch.

Both peers announce ``sha1(key)`` from the Endpoint's own socket, so what
the rendezvous records for each of them is the address its NAT maps that
socket to; each then looks up the other and calls :func:`utp.punch` with
the pair.  Today the rendezvous is a BEP 15 UDP tracker; the DHT
(``implied_port=1``) comes next.

Which entry of the tracker's peer list is us?  The tracker records our
public IP and the port we announce (opentracker ignores the source port),
and lists us too.  We announce our local port, so our entry is the one with
that port; when both peers happen to have the same port, the IP the
Endpoint is bound to decides, else we give up with an error that says so.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import TYPE_CHECKING, Any, Callable

import trio

from ._punch import end_time, is_initiator, punch
from ._stream import UTPStream, _format_peer

if TYPE_CHECKING:  # pragma: no cover
    from ._endpoint import Endpoint

__all__ = ["rendezvous", "RendezvousError", "info_hash_for"]


class RendezvousError(OSError):
    """The rendezvous could not pair us with a peer."""


def info_hash_for(key: str | bytes) -> bytes:
    """The 20-byte hash both peers announce for ``key``."""
    return hashlib.sha1(key.encode("utf-8") if isinstance(key, str) else key).digest()


def _norm_ip(host: Any) -> Any:
    ip = ipaddress.ip_address(str(host).split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def split_peers(peers: Any, local: tuple[Any, ...]) -> tuple[tuple[str, int] | None, list[tuple[str, int]]]:
    """(our entry or None, the others) in a tracker's peer list, for an
    Endpoint bound to ``local``."""
    port = int(local[1])
    bound = _norm_ip(local[0])
    mine = [p for p in peers if int(p[1]) == port]
    if len(mine) > 1 and not bound.is_unspecified:
        exact = [p for p in mine if _norm_ip(p[0]) == bound]
        if exact:
            mine = exact[:1]
    if len(mine) > 1:
        raise RendezvousError(
            f"cannot tell which of {', '.join(_format_peer(p) for p in mine)} is us: the peer "
            f"announced the same port {port}; bind another local port")
    me = mine[0] if mine else None
    others = [(str(p[0]), int(p[1])) for p in peers if p is not me and p not in mine]
    return me, others


async def rendezvous(ep: Endpoint, key: str | bytes, *, via: Any, deadline: float | None = None,
                     timeout: float | None = None, poll: float = 0.5,
                     log: Callable[[str], None] | None = None, **punch_options: Any) -> UTPStream:
    """Meet the peer that uses the same ``key`` and connect to it through
    both NATs; returns the uTP stream.

    ``via`` is a UDP tracker: ``"udp://HOST:PORT"`` or an ``(ip, port)``
    tuple.  Both peers announce ``sha1(key)`` (the tracker must accept that
    hash; opentracker's whitelist build needs it listed) every ``poll``
    seconds until the other shows up, then both :func:`punch`.  ``log``, if
    given, is called with a line for each step.  ``deadline`` (trio clock)
    or ``timeout`` bounds everything.  On the way out the announce is
    withdrawn (event "stopped"), so a stale entry does not confuse the next
    meeting with the same key.

    Raises TimeoutError when the peer never appeared or punching failed
    (the message says which), RendezvousError when the peer list cannot be
    read, and the tracker client's errors (e.g. tracker.TrackerError).
    """
    import tracker as _tracker  # a sibling package; imported late, utp works without it

    start = trio.current_time()
    end = end_time(start, timeout, deadline, "rendezvous")
    say = log or (lambda line: None)
    if isinstance(via, str):
        host, port = _tracker.parse_tracker_url(via)
        via = await _tracker.resolve_tracker(host, port)
    where = _format_peer(via)
    info_hash = info_hash_for(key)
    local = ep.local_address
    async with _tracker.open_tracker_client(ep, retry_base=1.0, max_retries=4) as client:
        try:
            me, peer = await _meet(client, via, info_hash, local, end, poll, say)
            if peer is None:
                raise TimeoutError(f"rendezvous at {where} timed out after "
                                   f"{trio.current_time() - start:.1f} s: no other peer announced "
                                   f"the key")
            if me is None:
                raise RendezvousError(f"the tracker at {where} did not list us among the peers, "
                                      f"so our public endpoint is unknown")
            role = ("initiator (sending SYNs)" if is_initiator(me, peer)
                    else "responder (probing, accepting)")
            say(f"peer {_format_peer(peer)}; we are {_format_peer(me)}; punching as the {role}")
            return await punch(ep, peer, local_public=me, deadline=end, **punch_options)
        finally:
            # Withdraw once punching is over (not before: the peer may
            # still be polling for us), so the next meeting with this key
            # starts clean.
            with trio.move_on_after(1.0) as cleanup:
                cleanup.shield = True
                try:
                    await client.announce(via, info_hash, event=_tracker.EVENT_STOPPED)
                except (OSError, TimeoutError):
                    pass


async def _meet(client: Any, via: Any, info_hash: bytes, local: Any, end: float, poll: float,
                say: Callable[[str], None]) -> tuple[Any, Any]:
    """Announce until another peer shows up (or ``end``); (us, peer)."""
    import tracker as _tracker

    me = peer = None
    announces = 0
    with trio.move_on_at(end):
        event = _tracker.EVENT_STARTED
        while True:
            result = await client.announce(via, info_hash, event=event, left=1, numwant=50)
            announces += 1
            event = _tracker.EVENT_NONE
            me, others = split_peers(result.peers, local)
            if announces == 1:
                say(f"announced {info_hash.hex()} to {_format_peer(via)}; it sees us as "
                    f"{_format_peer(me) if me else '(not listed)'}")
            if others:
                peer = others[-1]
                if len(others) > 1:
                    say(f"{len(others)} peers for this key; taking the newest, {_format_peer(peer)}")
                return me, peer
            await trio.sleep(poll)
    return me, peer
