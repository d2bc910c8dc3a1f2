"""UDP hole punching for uTP (DESIGN.md, "Connecting across NATs").

Both peers call :func:`punch` at about the same time, each with the other's
public endpoint (from a tracker, the DHT, or a relay).  A fixed tie-break
splits the work so that exactly one uTP connection results:

- the side whose public endpoint sorts lower, as ``(16-byte IPv6 or
  IPv4-mapped address, port)``, is the *initiator*: it opens fresh uTP
  connection attempts (a new connection id each, as connect-with-retry does)
  every ``interval`` seconds and keeps each one open until the engine's own
  SYN retries run out, so a SYN-ACK that comes late still completes it;
- the other side is the *responder*: it listens, sends small probe
  datagrams to the initiator (they open its own NAT's mapping and
  filter towards the initiator), and accepts exactly one connection: the
  first SYN from the initiator's IP address.  Every later SYN is refused
  with a RESET, so the initiator's other attempts end at once, and only the
  attempt the responder accepted can ever complete.

The responder accepts by IP address and not by port, and the initiator
retargets its attempts at the source of the first probe it receives from
the peer's IP (a "peer-reflexive" address, in ICE's words).  Both are needed
when one side is behind a symmetric NAT: its packets to us come from a
different public port than the one the rendezvous saw.

Probes are ``b"utpkit-punch"`` plus one version byte: not uTP (wrong
version nibble), not bencode, not BEP 15 (first word > 3), so the
demultiplexer hands them to the ``"other"`` owner, and an Endpoint that is
not punching counts and drops them.

Pacing: one attempt (or probe) every ``interval`` seconds during the first
``fast_period`` seconds, then one every ``keepalive`` seconds, which keeps
the NAT mappings of a long wait alive (home NATs drop idle UDP mappings
after ~30 s; uTP's own keepalive is 29 s).

Routers that answer (issue 10).  Many NATs have no input firewall: a packet
from the peer that reaches our router before we have sent anything to the
peer goes to the router's own stack, is answered with ICMP port
unreachable, and stays in its connection tracking as an unreplied inbound
flow (peer -> our public endpoint), refreshed by every further packet.  Our
own first packet to the peer would then have the same pair of endpoints in
reverse, so the NAT gives it another public port: we speak to the peer from
a port it has never heard of and its NAT, port-restricted, drops us, while
its packets go to a port that now leads nowhere.  Whoever's packets arrive
first spoils the other side, so the outcome depended on who learned of whom
first.  Punching therefore runs in two phases:

1. *Opening*: from the start, each side sends its probes with a small IP TTL
   (``open_ttl``, default 2).  They cross our own NAT, which creates the
   mapping and opens its filter towards the peer's public endpoint, and then
   expire in the network before the peer's NAT (there is always at least one
   router between two NATs on the internet; the lab's ``answering`` kind
   has one).  Nothing of ours can spoil the peer's router in this phase.
2. *Full*: ``hold`` seconds after the start, or at once when any packet
   from the peer's IP arrives (it was sent after the peer's own opening, so
   its NAT is open towards us), the initiator starts its uTP attempts and
   the responder its full-TTL probes, as above.

``hold`` must cover the difference between the two sides' calls to
:func:`punch`; :func:`utp.rendezvous` starts them at most one poll
interval apart (the later peer finds the earlier one at once, the earlier
finds the later at its next poll) and holds for two poll intervals.
Whatever got remapped anyway (a symmetric NAT, a router we could not keep
from answering) is still met by re-aiming: the initiator retargets at the
source of the peer's first probe and the responder accepts from any port of
the peer's IP.  Where the TTL cannot be limited (a simulated network, a
full socket buffer at the first probe) there is no opening phase and no
hold: full packets start at once, as before.

Symmetric against port-restricted (issue 10).  Re-aiming cannot help when
a symmetric NAT faces a port-restricted one: each drops the other's
packets, so neither side ever hears anything.  That silence is the
signal: when nothing at all came from the peer's IP ``birthday.after``
seconds past the hold, :func:`punch` stops the direct phase and switches
to birthday probing (:mod:`utp._birthday`: the symmetric side opens many
ports towards the peer, the other probes random ports of the symmetric
side's address until one pair meets), unless the caller turned it off or
the NATs' mapping behaviours say it cannot work (two symmetric NATs: an
error at once).

One connection, also under SYN cookies.  The responder admits exactly one
connection from the peer: its firewall (run by the engine before any
SYN-ACK) says yes to the first SYN and RESETs the initiator's later
attempts, so both sides settle on the same one.  A listener past its
half-open bounds (a SYN flood on a server that also punches) answers with
a stateless cookie and creates the connection only when the cookie comes
back, asking the firewall again; :class:`utp._birthday.FirstSyn` tells the
two questions apart (``Endpoint.admission_query``) and admits the same SYN
-- same address, same connection id -- until its connection exists.
"""

from __future__ import annotations

import ipaddress
import math
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import trio

from _utpkit.addr import addr_key as _addr_key
from _utpkit.addr import normalize_ip
from _utpkit.excgroup import unwrapped

from . import _utp
from ._connect import check_address
from ._birthday import BirthdayLimits, FirstSyn, birthday as _birthday, refuse_two_symmetric
from ._utp import EventKind
from ._stream import UTPStream, _format_peer

if TYPE_CHECKING:  # pragma: no cover
    from ._endpoint import DatagramQueue, Endpoint

__all__ = ["punch", "PROBE", "tie_break_key", "is_initiator"]

PROBE = b"utpkit-punch\x01"
_PROBE_PREFIX = b"utpkit-punch"
# At most this many attempts are open at once; with the defaults (0.1 s
# pacing, 15 s of engine SYN retries) the fast phase needs 50, so the cap
# only matters for very small intervals.
MAX_PENDING = 64


def _ip(addr: Any) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    return normalize_ip(addr[0])


def tie_break_key(addr: Any) -> tuple[bytes, int]:
    """``(16 address bytes, port)``: IPv4 as IPv4-mapped IPv6, so both
    peers order the same two endpoints the same way whatever the socket's
    family spells them as."""
    ip = _ip(addr)
    packed = ip.packed if ip.version == 6 else b"\x00" * 10 + b"\xff\xff" + ip.packed
    return packed, int(addr[1])


def is_initiator(local_public: Any, peer: Any) -> bool:
    """Whether the side with public endpoint ``local_public`` sends the SYNs
    when punching to ``peer`` (the lower endpoint initiates)."""
    mine, theirs = tie_break_key(local_public), tie_break_key(peer)
    if mine == theirs:
        raise ValueError(f"cannot punch to {_format_peer(peer)}: it is our own public endpoint")
    return mine < theirs


def _same_ip(a: Any, b: Any) -> bool:
    try:
        return _ip(a) == _ip(b)
    except (ValueError, TypeError, IndexError):
        return False


def end_time(start: float, timeout: float | None, deadline: float | None, what: str) -> float:
    """The earlier of ``start + timeout`` and ``deadline``; one is required."""
    end = math.inf
    if timeout is not None:
        if not timeout > 0:
            raise ValueError(f"timeout must be positive, not {timeout!r}")
        end = start + timeout
    if deadline is not None:
        end = min(end, deadline)
    if end == math.inf:
        raise ValueError(f"{what} needs a timeout or a deadline")
    return end


class _Pacer:
    """Times of the next attempt/probe: ``interval`` apart during the first
    ``fast_period`` seconds, ``keepalive`` apart after."""

    def __init__(self, start: float, interval: float, fast_period: float, keepalive: float) -> None:
        self.start = start
        self.interval = interval
        self.fast_end = start + fast_period
        self.keepalive = keepalive
        self.next = start
        self.sent = 0

    def advance(self, now: float) -> None:
        """Schedule the next send after one made at ``now`` (normally
        ``self.next``; later if the task was late)."""
        if self.next < self.fast_end - 1e-9:
            # Counted, not summed: 50 steps of 0.1 s end at 5.0 s exactly.
            self.sent += 1
            self.next = max(self.start + self.sent * self.interval, now)
        else:
            self.next = max(self.next + self.keepalive, now)


async def punch(ep: Endpoint, peer: tuple[Any, ...], *, deadline: float | None = None,
                timeout: float | None = None, local_public: tuple[Any, ...] | None = None,
                interval: float = 0.1, fast_period: float = 5.0,
                keepalive: float = 20.0, hold: float = 1.0,
                open_ttl: int | None = 2,
                birthday: BirthdayLimits | None = BirthdayLimits(),
                mapping: str | None = None, peer_mapping: str | None = None,
                peer_lag: float = 0.0,
                log: Callable[[str], None] | None = None) -> UTPStream:
    """Punch through the NATs between this Endpoint and ``peer`` and return
    the one uTP stream between them.

    ``peer`` is the other side's public ``(ip, port)`` as the rendezvous saw
    it; ``local_public`` is ours (default: the Endpoint's bound address, right
    when there is no NAT).  Both sides must use the same pair, since they decide
    who initiates by comparing them (:func:`is_initiator`).  ``deadline`` is
    absolute (trio clock), ``timeout`` seconds from now; one is required.

    ``hold`` is how long only NAT-opening probes with IP TTL ``open_ttl``
    go out before full packets (see the module docs: it must cover the gap
    between the two sides' calls); ``open_ttl=None`` sends no opening
    probes and holds nothing back, nor does ``hold=0`` (either is the
    behaviour before issue 10).

    ``birthday`` (caps: :class:`utp.BirthdayLimits`; None turns it off,
    and it is off on a simulated network, as it opens real sockets) is the
    fallback for a symmetric NAT facing a port-restricted one
    (:mod:`utp._birthday`): it starts when the direct phase heard nothing
    from the peer's IP for ``birthday.after`` seconds past ``hold``.
    ``mapping`` and ``peer_mapping`` are the NATs' mapping behaviours when
    known ("independent": one public port for every destination, a cone
    NAT; "dependent": a new one per destination, a symmetric NAT); they
    pick the birthday roles, and two dependent ones fail at once with
    :class:`utp.NATTraversalError`.  ``peer_lag`` is how much later than
    us the peer may have called :func:`punch` (a rendezvous that found the
    peer on its first look knows: the peer finds us at its next poll);
    birthday scans wait that long, so none goes to a port the peer has
    not opened yet.  ``log``, if given, gets a line per
    step (what connected, after how many packets).  The returned stream's
    ``punch_packets`` is how many datagrams this side sent until it
    connected, and ``birthday_probes`` (when birthday probing connected)
    the number of the probe that met.

    Raises TimeoutError naming what was tried (attempts, probes, what came
    back) when nothing connected in time; NATTraversalError when both NATs
    are known to be symmetric or birthday probing used up its cap;
    ValueError when ``peer`` is our own
    public endpoint; RuntimeError when the Endpoint already has an open
    listener (the responder needs its own, filtered one).

    Cancellation: nothing is left behind: pending attempts are closed, the
    punch's listener and probe queue are removed.
    """
    peer = check_address(peer)
    for name, value in (("interval", interval), ("fast_period", fast_period),
                        ("keepalive", keepalive)):
        if not value > 0:
            raise ValueError(f"{name} must be positive, not {value!r}")
    if not hold >= 0:
        raise ValueError(f"hold must be zero or positive, not {hold!r}")
    if not peer_lag >= 0:
        raise ValueError(f"peer_lag must be zero or positive, not {peer_lag!r}")
    if open_ttl is not None and not 1 <= open_ttl <= 255:
        raise ValueError(f"open_ttl must be 1..255 or None, not {open_ttl!r}")
    if keepalive > 25:
        raise ValueError(f"keepalive {keepalive!r} s is too long: NATs drop idle mappings "
                         f"after ~30 s, so keep it at most 25 s")
    refuse_two_symmetric(mapping, peer_mapping, f"punch to {_format_peer(peer)}")
    start = trio.current_time()
    end = end_time(start, timeout, deadline, "punch")
    if local_public is None:
        local_public = ep.local_address
        if _ip(local_public).is_unspecified:
            raise ValueError("punch needs local_public (our public endpoint, as the rendezvous "
                             "saw it): the Endpoint is bound to the wildcard address, and both "
                             "sides must compare the same pair of endpoints")
    initiator = is_initiator(local_public, peer)
    ep.check_open()
    queue: DatagramQueue | None = None
    try:
        queue = ep.datagram_queue("other", maxlen=64)
    except RuntimeError:
        queue = None  # someone else owns "other": punch without reading probes
    phase = _Phase(ep, peer, start, hold, open_ttl, interval,
                   lambda t: _Pacer(t, interval, fast_period, keepalive))
    say = log or (lambda line: None)

    async def direct() -> UTPStream:
        if initiator:
            return await _initiate(ep, peer, queue, start, end, phase, say)
        return await _respond(ep, peer, queue, start, end, phase, say)

    try:
        if birthday is None or ep.simulated:
            # Birthday probing opens real UDP sockets: not on a simulated network.
            return await direct()
        return await _direct_then_birthday(ep, peer, queue, end, phase, direct, birthday,
                                           initiator, mapping, peer_mapping, open_ttl,
                                           peer_lag, say)
    finally:
        if queue is not None:
            # Unregister, so a later punch (or another owner) can have it.
            ep.release_datagram_queue(queue)


class _Phase:
    """Opening, then full (module docs): ``full`` is set at ``start +
    hold`` or by :meth:`heard`; ``run_opening`` sends the low-TTL probes
    until then; ``pacer`` paces the full phase from the moment it began."""

    def __init__(self, ep: Endpoint, peer: Any, start: float, hold: float, ttl: int | None,
                 interval: float, make_pacer: Callable[[float], _Pacer]) -> None:
        self.ep = ep
        self.start = start
        self.targets: list[Any] = [peer]
        self.full_at = start + hold
        self.ttl = ttl
        self.interval = interval
        self.make_pacer = make_pacer
        self.full = trio.Event()
        self.pacer = make_pacer(start)
        self.opening_sent = 0
        self.sent = 0            # full-TTL attempts and probes, for the packet count
        self.heard_peer = False
        if hold <= 0:
            self._go_full(start)

    def _go_full(self, now: float) -> None:
        if not self.full.is_set():
            self.pacer = self.make_pacer(now)
            self.full.set()

    def heard(self) -> None:
        """A packet from the peer's IP arrived: its NAT is open towards us."""
        self.heard_peer = True
        self._go_full(trio.current_time())

    async def run_opening(self) -> None:
        # Holding back only makes sense while our low-TTL probes open our
        # NAT: without them (open_ttl None, or a network that cannot limit
        # the TTL) go full at once, exactly as before issue 10.
        with trio.move_on_at(self.full_at):
            while not self.full.is_set() and self.ttl is not None:
                for t in list(self.targets):
                    if await self.ep.sendto_with_ttl(PROBE, t, self.ttl):
                        self.opening_sent += 1
                if not self.opening_sent:
                    break
                with trio.move_on_after(self.interval):
                    await self.full.wait()
        self._go_full(trio.current_time())


def _is_probe_from(data: bytes, addr: Any, peer: Any) -> bool:
    return data.startswith(_PROBE_PREFIX) and _same_ip(addr, peer)


class _Attempt:
    __slots__ = ("sock", "addr", "started")

    def __init__(self, sock: _utp.Socket, addr: Any, started: float) -> None:
        self.sock = sock
        self.addr = addr
        self.started = started


async def _initiate(ep: Endpoint, peer: tuple[Any, ...], queue: DatagramQueue | None,
                    start: float, end: float, phase: _Phase,
                    say: Callable[[str], None]) -> UTPStream:
    events: list[tuple[_Attempt, EventKind, Any]] = []
    lot = trio.lowlevel.ParkingLot()
    pending: list[_Attempt] = []
    target: tuple[Any, ...] = peer
    opened = refused = timed_out = probes_seen = 0
    targets = phase.targets
    winner: _Attempt | None = None

    def waiter_for(att: _Attempt) -> Any:
        def waiter(kind: EventKind, arg: Any) -> None:
            events.append((att, kind, arg))
            lot.unpark_all()
        return waiter

    async def read_probes() -> None:
        nonlocal target, probes_seen
        assert queue is not None
        async for data, addr in queue:
            if not _is_probe_from(data, addr, peer):
                continue
            probes_seen += 1
            phase.heard()
            if _addr_key(addr) != _addr_key(target):
                # The peer's NAT maps it to another port towards us than
                # towards the rendezvous (a symmetric NAT, or a router that
                # answered): aim there now.
                target = (addr[0], addr[1])
                targets.append(target)
                phase.pacer.next = trio.current_time()
            lot.unpark_all()

    async def wake_when_full() -> None:
        await phase.full.wait()
        lot.unpark_all()

    try:
        async with unwrapped(), trio.open_nursery() as nursery:
            if queue is not None:
                nursery.start_soon(read_probes)
            nursery.start_soon(phase.run_opening)
            nursery.start_soon(wake_when_full)
            while winner is None:
                while events:
                    att, kind, arg = events.pop(0)
                    if kind is EventKind.CONNECT:
                        winner = att
                        break
                    if att in pending:
                        pending.remove(att)
                        if kind is EventKind.ERROR and arg == _utp.UTP_ETIMEDOUT:
                            timed_out += 1
                        else:
                            refused += 1
                if winner is not None:
                    break
                now = trio.current_time()
                if now >= end:
                    break
                pacer = phase.pacer
                if phase.full.is_set() and now >= pacer.next:
                    if len(pending) < MAX_PENDING:
                        sock = ep.open_engine_socket(target)
                        att = _Attempt(sock, target, now)
                        sock.userdata = waiter_for(att)
                        pending.append(att)
                        opened += 1
                        phase.sent += 1
                        ep.after_engine_call()  # the SYN leaves now
                    pacer.advance(now)
                wake = phase.pacer.next if phase.full.is_set() else math.inf
                with trio.move_on_at(min(wake, end)):
                    await lot.park()
            nursery.cancel_scope.cancel()
        if winner is not None:
            pending.remove(winner)
            stream = UTPStream(ep, winner.sock, winner.addr)
            stream.punch_packets = opened + phase.opening_sent  # type: ignore[attr-defined]
            say(f"punched as the initiator after {trio.current_time() - start:.2f} s: "
                f"{opened + phase.opening_sent} datagrams sent ({opened} uTP connection "
                f"attempts, {phase.opening_sent} NAT-opening probes)")
            return stream
    finally:
        for att in pending:
            att.sock.userdata = None
            if not att.sock.destroyed and not ep.engine_closed:
                att.sock.close()
        if pending and not ep.engine_closed:
            ep.after_engine_call()
    elapsed = trio.current_time() - start
    where = " then ".join(_format_peer(t) for t in targets)
    heard = (f"{probes_seen} probe{'s' if probes_seen != 1 else ''} from the peer arrived"
             if probes_seen else "no probe from the peer arrived")
    heard += _opening_note(phase)
    raise TimeoutError(
        f"hole punching to {_format_peer(peer)} timed out after {elapsed:.1f} s: as the "
        f"initiator sent {opened} uTP connection attempt{'s' if opened != 1 else ''} to {where} "
        f"({refused} refused, {timed_out} timed out, {len(pending)} unanswered); {heard}")


def _opening_note(phase: _Phase) -> str:
    if not phase.opening_sent:
        return ""
    return (f"; {phase.opening_sent} NAT-opening probe{'s' if phase.opening_sent != 1 else ''} "
            f"with TTL {phase.ttl} before that")


async def _respond(ep: Endpoint, peer: tuple[Any, ...], queue: DatagramQueue | None,
                   start: float, end: float, phase: _Phase,
                   say: Callable[[str], None]) -> UTPStream:
    # Connections from the peer's IP (any port: a symmetric NAT sends from a
    # port the rendezvous never saw) are ours; the application's listener,
    # if any, keeps getting everyone else's.
    listener = ep.claim_incoming(lambda addr: _same_ip(addr, peer), backlog=1)
    # SYNs from other addresses that no listener took (for the error message).
    unclaimed_before = ep.statistics().get("refused_unclaimed", 0)
    # Exactly one connection: the first SYN (and, under SYN cookies, its
    # retransmissions and the cookie's return).
    gate = FirstSyn(ep)

    def firewall(addr: Any) -> bool:
        if gate(addr):
            phase.heard()
            return True
        return False

    listener.firewall = firewall
    targets = phase.targets
    probes = 0
    probes_seen = 0
    stream: UTPStream | None = None

    async def read_probes() -> None:
        nonlocal probes_seen
        assert queue is not None
        async for data, addr in queue:
            if _is_probe_from(data, addr, peer):
                probes_seen += 1
                phase.heard()
                if all(_addr_key(addr) != _addr_key(t) for t in targets):
                    targets.append((addr[0], addr[1]))

    async def send_probes() -> None:
        nonlocal probes
        await phase.full.wait()
        while True:
            now = trio.current_time()
            pacer = phase.pacer
            if now >= pacer.next:
                for t in list(targets):
                    await ep.sendto(PROBE, t)
                    probes += 1
                    phase.sent += 1
                pacer.advance(now)
            await trio.sleep_until(pacer.next)

    try:
        with trio.move_on_at(end):
            async with unwrapped(), trio.open_nursery() as nursery:
                nursery.start_soon(phase.run_opening)
                nursery.start_soon(send_probes)
                if queue is not None:
                    nursery.start_soon(read_probes)
                stream = await listener.accept()
                nursery.cancel_scope.cancel()
    finally:
        listener._shutdown()
    if stream is not None:
        stream.punch_packets = probes + phase.opening_sent  # type: ignore[attr-defined]
        say(f"punched as the responder after {trio.current_time() - start:.2f} s: "
            f"{probes + phase.opening_sent} datagrams sent ({probes} probes, "
            f"{phase.opening_sent} NAT-opening probes)")
        return stream
    elapsed = trio.current_time() - start
    where = " and ".join(_format_peer(t) for t in targets)
    n_other = ep.statistics().get("refused_unclaimed", 0) - unclaimed_before if not ep.closed else 0
    refused = (f"; refused {n_other} connection{'s' if n_other != 1 else ''} "
               f"from other addresses" if n_other else "")
    raise TimeoutError(
        f"hole punching to {_format_peer(peer)} timed out after {elapsed:.1f} s: as the "
        f"responder sent {probes} probe{'s' if probes != 1 else ''} to {where} and listened, "
        f"but no uTP connection came from {_ip(peer)}{refused}{_opening_note(phase)}")



async def _direct_then_birthday(ep: Endpoint, peer: tuple[Any, ...], queue: DatagramQueue | None,
                                end: float, phase: _Phase,
                                direct: Callable[[], Awaitable[UTPStream]],
                                limits: BirthdayLimits, initiator: bool, mapping: str | None,
                                peer_mapping: str | None, open_ttl: int | None,
                                peer_lag: float, say: Callable[[str], None]) -> UTPStream:
    """Punch directly; if nothing at all came from the peer's IP by
    ``hold + limits.after`` seconds, switch to birthday probing
    (utp._birthday) for the rest of the time."""
    switch_at = phase.full_at + limits.after
    won: list[UTPStream] = []
    failed: list[BaseException] = []
    async with unwrapped(), trio.open_nursery() as nursery:
        async def run_direct() -> None:
            try:
                won.append(await direct())
            except TimeoutError as exc:
                failed.append(exc)
            nursery.cancel_scope.cancel()

        async def watch() -> None:
            await trio.sleep_until(switch_at)
            if not phase.heard_peer:
                nursery.cancel_scope.cancel()
        nursery.start_soon(run_direct)
        nursery.start_soon(watch)
    if won:
        return won[0]
    if failed:
        raise failed[0]
    # Roles (utp._birthday, "Who plays which role").
    if mapping is not None:
        spray, scan = mapping == "dependent", mapping == "independent"
    elif peer_mapping is not None:
        spray, scan = peer_mapping == "independent", peer_mapping == "dependent"
    else:
        spray = scan = True
    why = (f"nothing came from {_ip(peer)} in {limits.after:g} s of direct punching"
           + (f" (our NAT: {mapping})" if mapping else "")
           + (f" (the peer's NAT: {peer_mapping})" if peer_mapping else ""))
    stream = await _birthday(ep, peer, queue, end=end, spray=spray, scan=scan,
                             initiator=initiator, limits=limits, open_ttl=open_ttl, log=say,
                             why=why, start=phase.start,
                             direct_sent=phase.sent + phase.opening_sent, scan_delay=peer_lag)
    return stream
