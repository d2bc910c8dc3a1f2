"""Rendezvous: find the other peer by a shared key, then punch.

Both peers announce ``sha1(key)`` from the Endpoint's own socket, so what
the rendezvous records for each of them is the address its NAT maps that
socket to; each then looks up the other and calls :func:`utp.punch` with
the pair.  The rendezvous is a BEP 15 UDP tracker or the Mainline DHT
(BEP 5, announcing with ``implied_port=1``).

Which entry of the tracker's peer list is us?  The tracker records our
public IP and the port we announce (opentracker ignores the source port),
and lists us too.  We announce our local port, so our entry is the one with
that port; when both peers happen to have the same port, the IP the
Endpoint is bound to decides, else we give up with an error that says so.

Which entry of the DHT's peer list is us?  The nodes that store us record
the address our announce came from (``implied_port``), and every node that
answers us reports that address in its ``ip`` field; the Endpoint tallies
those reports (:attr:`Endpoint.external_address`).  An entry is us when some
node reported it as our address; our public endpoint for the tie-break is
our entry in the list (what the peer sees too), else the Endpoint's winner.
The DHT has no "stopped": entries expire, so use a fresh key per meeting.

Mapping behaviour (for birthday probing's roles, utp._birthday): when DHT
nodes reported our one public IP at different ports, our NAT maps per
destination, and :func:`rendezvous` passes ``mapping="dependent"`` to
:func:`punch` (unless the caller gave one).  A tracker reports nothing
about our port, so there the roles come from punching's own silence.
"""

from __future__ import annotations

import hashlib
import math
from typing import TYPE_CHECKING, Any, Callable

import trio

from _utpkit.addr import addr_key as _key
from _utpkit.addr import normalize_ip as _norm_ip
from _utpkit.errors import NetworkError

from ._birthday import mapping_from_reports, refuse_two_symmetric
from ._punch import end_time, is_initiator, punch
from ._stream import UTPStream, _format_peer

if TYPE_CHECKING:  # pragma: no cover
    from ._endpoint import Endpoint

__all__ = ["rendezvous", "RendezvousError", "info_hash_for", "split_dht_peers"]


class RendezvousError(NetworkError):
    """The rendezvous could not pair us with a peer."""


def info_hash_for(key: str | bytes) -> bytes:
    """The 20-byte hash both peers announce for ``key``."""
    return hashlib.sha1(key.encode("utf-8") if isinstance(key, str) else key).digest()


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
    tuple; or the DHT: a node from ``dht.open_node`` on this same Endpoint,
    or ``("dht", [(host, port), ...])`` to run a read-only node (BEP 43)
    bootstrapped from those nodes for the duration of the call (nothing
    else is contacted).  With the DHT, both peers announce ``sha1(key)``
    once (``implied_port=1``) and look it up every ``poll`` seconds until
    the other shows up.  With a tracker, both peers announce ``sha1(key)``
    (the tracker must accept that hash; opentracker's whitelist build needs it listed) every ``poll``
    seconds until the other shows up, then both :func:`punch`.  ``log``, if
    given, is called with a line for each step.  ``deadline`` (trio clock)
    or ``timeout`` bounds everything.  On the way out the announce is
    withdrawn (event "stopped"), so a stale entry does not confuse the next
    meeting with the same key (tracker only: DHT entries just expire).

    Raises TimeoutError when the tracker never answered, the peer never
    appeared or punching failed (the message says which),
    ConnectionRefusedError at once when the kernel reports ICMP port
    unreachable from the tracker (nothing listens there),
    RendezvousError when the peer list cannot be read or no DHT node
    stored our announce, and the tracker client's errors (e.g.
    tracker.TrackerError).  Every message names the tracker, node or peer.
    """
    # Told both NATs are symmetric: fail before meeting (the first to meet
    # would fail at once and withdraw, leaving the other to time out).
    refuse_two_symmetric(punch_options.get("mapping"), punch_options.get("peer_mapping"),
                         "connect through the rendezvous")
    start = trio.current_time()
    end = end_time(start, timeout, deadline, "rendezvous")
    # The two peers call punch at most one poll apart (the later one finds
    # the earlier at once, the earlier finds it at its next poll): hold
    # full-TTL packets back for two polls (utp._punch, "Routers that answer").
    say = log or (lambda line: None)
    punch_options = {"hold": max(1.0, 2 * poll), "log": say, **punch_options}
    if _is_dht(via):
        return await _rendezvous_dht(ep, key, via, start, end, poll, say, punch_options)

    import tracker as _tracker  # a sibling package; imported late, utp works without it

    if isinstance(via, str):
        host, port = _tracker.parse_tracker_url(via)
        via = await _tracker.resolve_tracker(host, port)
    where = _format_peer(via)
    info_hash = info_hash_for(key)
    local = ep.local_address
    async with _tracker.open_tracker_client(ep, retry_base=1.0, max_retries=4) as client:
        try:
            me, peer, answers = await _meet(ep, client, via, info_hash, local, end, poll, say)
            if peer is None and answers == 0:
                # Not the peer's fault: nobody ever told us anything.
                raise TimeoutError(f"tracker udp://{where} did not answer "
                                   f"{_unreachable_note(ep, via)}"
                                   f"in {trio.current_time() - start:.1f} s")
            if peer is None:
                raise TimeoutError(f"rendezvous at tracker udp://{where} timed out after "
                                   f"{trio.current_time() - start:.1f} s: the tracker answered "
                                   f"{answers} announce{'s' if answers != 1 else ''}, but no "
                                   f"other peer announced the key")
            if me is None:
                raise RendezvousError(f"the tracker at {where} did not list us among the peers, "
                                      f"so our public endpoint is unknown")
            role = ("initiator (sending SYNs)" if is_initiator(me, peer)
                    else "responder (probing, accepting)")
            say(f"peer {_format_peer(peer)}; we are {_format_peer(me)}; punching as the {role}")
            if answers == 1 and "peer_lag" not in punch_options:
                # The peer was there at once: it finds us at its next poll.
                punch_options = {**punch_options, "peer_lag": poll}
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


def _unreachable_note(ep: Any, addr: Any) -> str:
    """"(ICMP port unreachable) " when the Endpoint saw the kernel report
    that nothing listens at addr, else ""."""
    seen = getattr(ep, "port_unreachable", None)
    try:
        return "(ICMP port unreachable: nothing listens there) " if seen and seen(addr) else ""
    except (TypeError, ValueError):
        return ""


async def _announce(ep: Any, client: Any, via: Any, info_hash: bytes, event: int) -> Any:
    """One announce; ConnectionRefusedError as soon as the kernel reports
    ICMP port unreachable from the tracker (the client would keep
    retransmitting into the void)."""
    result: list[Any] = []
    async with trio.open_nursery() as nursery:
        async def ask() -> None:
            result.append(await client.announce(via, info_hash, event=event, left=1, numwant=50))
            nursery.cancel_scope.cancel()

        async def refused() -> None:
            await ep.wait_port_unreachable(via)
            nursery.cancel_scope.cancel()
        nursery.start_soon(ask)
        if hasattr(ep, "wait_port_unreachable"):
            nursery.start_soon(refused)
    if not result:
        raise ConnectionRefusedError(f"tracker udp://{_format_peer(via)} did not answer (ICMP port "
                                     f"unreachable: nothing listens there)")
    return result[0]


async def _meet(ep: Any, client: Any, via: Any, info_hash: bytes, local: Any, end: float,
                poll: float, say: Callable[[str], None]) -> tuple[Any, Any, int]:
    """Announce until another peer shows up (or ``end``); (us, peer, how
    many announces the tracker answered)."""
    import tracker as _tracker

    me = peer = None
    announces = 0
    with trio.move_on_at(end):
        event = _tracker.EVENT_STARTED
        while True:
            result = await _announce(ep, client, via, info_hash, event)
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
                return me, peer, announces
            await trio.sleep(poll)
    return me, peer, announces


# ---- the DHT ------------------------------------------------------------------------------

def _is_dht(via: Any) -> bool:
    if isinstance(via, tuple) and len(via) == 2 and via[0] == "dht":
        return True
    return hasattr(via, "get_peers") and hasattr(via, "announce") and hasattr(via, "endpoint")


def _our_addresses(ep: Endpoint, node: Any) -> dict[tuple[Any, int], tuple[str, int]]:
    """Every address some node reported as ours (the Endpoint's votes, the
    node's own view), and the bound address when it is a specific one."""
    found: dict[tuple[Any, int], tuple[str, int]] = {}
    candidates: list[Any] = [ep.external_address, getattr(node, "external_address", None)]
    candidates += ep.reported_addresses()
    local = ep.local_address
    try:
        if not _norm_ip(local[0]).is_unspecified:
            candidates.append(local)
    except ValueError:
        pass
    for a in candidates:
        if a is None:
            continue
        try:
            found.setdefault(_key(a), (str(_norm_ip(a[0])), int(a[1])))
        except (ValueError, TypeError, IndexError):
            continue
    return found


def split_dht_peers(peers: Any, ours: dict[tuple[Any, int], Any],
                    preferred: Any = None) -> tuple[tuple[str, int] | None, list[tuple[str, int]]]:
    """(our entry or None, the others) in a DHT peer list, given the
    addresses reported as ours (``preferred``, the Endpoint's winner, wins
    when we are listed more than once)."""
    mine: list[tuple[str, int]] = []
    others: list[tuple[str, int]] = []
    for p in peers:
        entry = (str(_norm_ip(p[0])), int(p[1]))
        if entry[1] == 0:
            continue
        (mine if _key(entry) in ours else others).append(entry)
    me = mine[0] if mine else None
    if preferred is not None and len(mine) > 1:
        for m in mine:
            if _key(m) == _key(preferred):
                me = m
    return me, list(dict.fromkeys(others))


async def _rendezvous_dht(ep: Endpoint, key: str | bytes, via: Any, start: float, end: float,
                          poll: float, say: Callable[[str], None],
                          punch_options: dict[str, Any]) -> UTPStream:
    if isinstance(via, tuple):
        import dht as _dht  # a sibling package, imported late like the tracker client

        boot = [(str(a[0]), int(a[1])) for a in via[1]]
        if not boot:
            raise ValueError("rendezvous via the DHT needs at least one bootstrap node")
        where = ", ".join(_format_peer(b) for b in boot)
        with trio.move_on_at(end) as bootstrapping:
            # Read-only (BEP 43): a short-lived node stays out of others'
            # tables and stores nothing, so only full nodes record us.
            async with _dht.open_node(ep, bootstrap=boot, read_only=True) as node:
                # Bootstrapped: from here on the meeting and the punch keep
                # the deadline themselves and raise their own errors.
                bootstrapping.deadline = math.inf
                return await _dht_meet_and_punch(ep, node, key, where, start, end, poll, say,
                                                 punch_options)
        refused = [b for b in boot if ep.port_unreachable(b, since=start)]
        why = (f"; {', '.join(_format_peer(b) for b in refused)}: ICMP port unreachable "
               f"(no DHT node listens there)" if refused else ": no bootstrap node answered")
        raise TimeoutError(f"rendezvous through the DHT at {where} timed out after "
                           f"{trio.current_time() - start:.1f} s while bootstrapping{why}")
    if getattr(via, "endpoint", ep) is not ep:
        raise ValueError("the DHT node given as via must run on the same Endpoint")
    return await _dht_meet_and_punch(ep, via, key, "the DHT", start, end, poll, say, punch_options)


async def _dht_meet_and_punch(ep: Endpoint, node: Any, key: str | bytes, where: str, start: float,
                              end: float, poll: float, say: Callable[[str], None],
                              punch_options: dict[str, Any]) -> UTPStream:
    info_hash = info_hash_for(key)
    me: tuple[str, int] | None = None
    peer: tuple[str, int] | None = None
    accepted = None
    lookups = 0
    with trio.move_on_at(end):
        result = await node.announce(info_hash)         # implied_port=1
        accepted = result.accepted
        ext = ep.external_address or getattr(node, "external_address", None)
        say(f"announced {info_hash.hex()} through {where} (implied port): {result.accepted} "
            f"node{'s' if result.accepted != 1 else ''} stored us; they see us as "
            f"{_format_peer(ext) if ext else '(not reported)'}")
        if result.accepted == 0:
            raise RendezvousError(f"no DHT node at {where} stored our announce "
                                  f"({'; '.join(map(str, result.errors)) or 'no node answered'})")
        while True:
            peers = await node.get_peers(info_hash).wait()
            lookups += 1
            ours = _our_addresses(ep, node)
            me, others = split_dht_peers(peers, ours, ep.external_address)
            if others:
                peer = others[-1]
                if len(others) > 1:
                    say(f"{len(others)} peers for this key; taking {_format_peer(peer)}")
                break
            await trio.sleep(poll)
    if peer is None:
        raise TimeoutError(f"rendezvous through the DHT at {where} timed out after "
                           f"{trio.current_time() - start:.1f} s: no other peer announced the key "
                           f"({lookups} lookup{'s' if lookups != 1 else ''}, our announce stored by "
                           f"{accepted if accepted is not None else 'no'} node"
                           f"{'s' if accepted != 1 else ''})")
    if me is None:
        ext = ep.external_address or getattr(node, "external_address", None)
        if ext is None:
            raise RendezvousError(f"no DHT node at {where} reported our address, so our public "
                                  f"endpoint is unknown")
        me = (str(_norm_ip(ext[0])), int(ext[1]))
    role = ("initiator (sending SYNs)" if is_initiator(me, peer)
            else "responder (probing, accepting)")
    say(f"peer {_format_peer(peer)}; we are {_format_peer(me)}; punching as the {role}")
    if lookups == 1 and "peer_lag" not in punch_options:
        # The peer was there at once: it finds us at its next lookup.
        punch_options = {**punch_options, "peer_lag": poll}
    if "mapping" not in punch_options:
        # Several DHT nodes that saw us at different ports: our NAT maps
        # per destination (utp._birthday, "Who plays which role").
        punch_options = {**punch_options, "mapping": mapping_from_reports(ep.reported_addresses())}
    return await punch(ep, peer, local_public=me, deadline=end, **punch_options)
