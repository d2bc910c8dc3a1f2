"""Birthday probing: hole punching when one NAT is symmetric (issue 10).

Why: a symmetric NAT (endpoint-dependent mapping: a new random public port
for every destination) sends our packets to the peer from a port the
rendezvous never saw, and a port-restricted peer NAT (``restricted``,
``answering``, a double NAT) drops everything from a port it has not sent
to.  The peer cannot guess the one port; but it can guess *one of many*.

How: the two roles,

- *spraying* (the symmetric side): open ``ports`` extra UDP sockets and
  send one small datagram from each to the peer's public endpoint (the one
  the rendezvous saw; a port-restricted cone NAT keeps it for every
  destination).  Each opens a mapping and a filter on our NAT: ``ports``
  random public ports that all accept packets from exactly that endpoint.
  These go out with the small IP TTL of punching's opening phase
  (``open_ttl``, :mod:`utp._punch`): they must not reach the peer's router,
  which, if it answers unsolicited packets, would keep them and spoil the
  very pair we hope for (the peer's probe to that port would get another
  public port).  They are refreshed every ``refresh`` seconds.
- *scanning* (the cone side): send probes from the Endpoint's own socket
  to random ports of the peer's public IP (a random permutation of
  1024-65535, each port at most once), ``rate`` per second and at most
  ``max_probes`` in all.  Each probe opens our filter towards that port.

A probe that hits one of the sprayed ports passes the symmetric NAT (it is
the reply its mapping waits for) and reaches an extra socket.  With ``k``
ports open among the ~64,500 a NAT hands out, a probe hits with chance
``k/64512``: about 250 probes for k = 256 on average, 1,200 for 99%.

Which socket carries the connection.  The design keeps one Endpoint per
UDP socket, and the pair that met is (the sprayer's extra socket i, the
scanner's Endpoint socket).  The sprayer, which learns of the meeting
first, answers the probe with an acknowledgement (carrying the probe's
number, so both sides can report it) and **turns socket i into an Endpoint
of its own**: a uTP engine on that socket, running as a trio system task
that belongs to the returned stream (like :func:`utp.open_utp_stream`'s);
closing the stream shuts it down after the FIN exchange.  From it the
sprayer connects to the scanner's public endpoint; the scanner listens on
its own Endpoint and accepts the first SYN from the peer's IP.  The other
extra sockets are closed.  So on the symmetric side the stream's
``endpoint`` is not the Endpoint passed to :func:`utp.punch`: that one
still serves the DHT or tracker.

Who plays which role.  When the mapping behaviours are known (``mapping``,
``peer_mapping``: "independent" or "dependent"), the dependent side sprays
and the independent side scans, and two dependent sides fail at once with
:class:`NATTraversalError`: no punching crosses two symmetric NATs.  When
they are not known (a BEP 15 tracker never tells us our public port, so
there is nothing to compare), :func:`utp.punch` starts this only after its
direct phase heard nothing at all from the peer for a while -- the mark of
a symmetric NAT facing a port-restricted one -- and then both sides play
both roles.  Only a sprayed port of a symmetric side can be hit, so one
connection results; two symmetric sides end at the deadline (or the cap)
with an error that says so.  (Two cone NATs whose direct phase failed,
which is not a case of theory, could meet both ways at once; the
tie-break initiator then refuses the other meeting's SYN.)

Costs and bounds: at most ``ports`` extra sockets, ``spray_rate`` opening
datagrams and ``rate`` scans per second, ``max_probes`` scans; after the
cap the scanner waits ``grace`` seconds for a late SYN and then gives up
with a clear error, as it does at the deadline.
"""

from __future__ import annotations

import errno
import random
import socket as _socket
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

import trio

from _utpkit.addr import addr_key as _addr_key
from _utpkit.addr import normalize_ip
from _utpkit.errors import NetworkError
from _utpkit.excgroup import unwrapped

from . import _utp
from ._stream import UTPStream, _format_peer

if TYPE_CHECKING:  # pragma: no cover
    from ._endpoint import DatagramQueue, Endpoint

__all__ = ["BirthdayLimits", "NATTraversalError", "birthday", "MAPPINGS", "mapping_from_reports",
           "BDAY_PREFIX", "refuse_two_symmetric"]

MAPPINGS = ("independent", "dependent")
BDAY_PREFIX = b"utpkit-bday"
_OPEN, _PROBE, _ACK = 0, 1, 2
_FIRST_PORT = 1024          # NATs map unprivileged source ports into 1024-65535


class NATTraversalError(NetworkError):
    """Hole punching cannot connect these two NATs (both symmetric), or
    birthday probing used up its cap without a meeting."""


@dataclass(frozen=True)
class BirthdayLimits:
    """User caps for birthday probing (module docs).

    ``ports``: extra sockets the spraying side opens (1..1024);
    ``rate``: scan probes per second;
    ``spray_rate``: the spraying side's datagrams per second (a burst of
    ``ports`` small, low-TTL datagrams that open our own NAT, again every
    ``refresh`` seconds; quick, so the scans find the ports open);
    ``max_probes``: random ports the scanning side probes in all;
    ``after``: seconds of hearing nothing in the direct phase before it
    starts, when the NATs' mapping behaviours are not known;
    ``refresh``: seconds between sprays that keep the mappings alive;
    ``grace``: seconds to wait for a late SYN after the cap."""

    ports: int = 256
    rate: float = 400.0
    spray_rate: float = 2000.0
    max_probes: int = 6000
    after: float = 2.0
    refresh: float = 10.0
    grace: float = 2.0

    def __post_init__(self) -> None:
        if not 1 <= self.ports <= 1024:
            raise ValueError(f"birthday ports must be 1..1024, not {self.ports!r}")
        if not self.rate > 0:
            raise ValueError(f"birthday rate must be positive, not {self.rate!r}")
        if not self.spray_rate > 0:
            raise ValueError(f"birthday spray_rate must be positive, not {self.spray_rate!r}")
        if self.max_probes < 1:
            raise ValueError(f"birthday max_probes must be at least 1, not {self.max_probes!r}")
        if not self.refresh > 0:
            raise ValueError(f"birthday refresh must be positive, not {self.refresh!r}")
        for name in ("after", "grace"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"birthday {name} must be zero or positive, not {value!r}")


def check_mapping(name: str, value: str | None) -> None:
    if value is not None and value not in MAPPINGS:
        raise ValueError(f"{name} must be one of {MAPPINGS} or None, not {value!r}")


def refuse_two_symmetric(mapping: str | None, peer_mapping: str | None, what: str) -> None:
    """Check the mapping arguments; NATTraversalError when both NATs are
    known to be symmetric (``what``: "punch to HOST:PORT", ...)."""
    check_mapping("mapping", mapping)
    check_mapping("peer_mapping", peer_mapping)
    if mapping == "dependent" and peer_mapping == "dependent":
        raise NATTraversalError(
            f"cannot {what}: both NATs map every destination to a new port (symmetric), so "
            f"neither side can know a port the other will answer from; hole punching (birthday "
            f"probing too) cannot cross that: use port mapping or a relay")


def mapping_from_reports(reported: list[tuple[Any, ...]]) -> str | None:
    """Our NAT's mapping behaviour from the addresses peers reported as ours
    (:meth:`Endpoint.reported_addresses`): "dependent" when the same public
    IP was reported with different ports (each reporter saw another
    mapping), else None (one report, or agreeing ones, say nothing
    certain: a port-preserving NAT and a lucky symmetric one look alike)."""
    ports: dict[Any, set[int]] = {}
    for a in reported:
        try:
            ports.setdefault(normalize_ip(a[0]), set()).add(int(a[1]))
        except (ValueError, TypeError, IndexError):
            continue
    return "dependent" if any(len(p) > 1 for p in ports.values()) else None


def _datagram(kind: int, n: int) -> bytes:
    return BDAY_PREFIX + struct.pack(">BI", kind, n)


def _parse(data: bytes) -> tuple[int, int] | None:
    if len(data) != len(BDAY_PREFIX) + 5 or not data.startswith(BDAY_PREFIX):
        return None
    kind, n = struct.unpack(">BI", data[len(BDAY_PREFIX):])
    return kind, n


def _set_ttl(sock: Any, family: int, ttl: int) -> bool:
    level, opt = ((_socket.IPPROTO_IP, _socket.IP_TTL) if family == _socket.AF_INET
                  else (_socket.IPPROTO_IPV6, _socket.IPV6_UNICAST_HOPS))
    try:
        sock.setsockopt(level, opt, ttl)
        return True
    except OSError:
        return False


class _Pacer:
    """``rate`` sends per second, shared by one role's loop."""

    def __init__(self, rate: float) -> None:
        self.gap = 1.0 / rate
        self.next = trio.current_time()

    async def wait(self) -> None:
        now = trio.current_time()
        if self.next > now:
            await trio.sleep_until(self.next)
        self.next = max(self.next + self.gap, now - 4 * self.gap)


@dataclass
class _Report:
    """What birthday probing did, for the log and the errors."""

    sprayed_ports: int = 0
    sprays: int = 0
    probes: int = 0
    met_probe: int | None = None     # the probe number that met (either side)
    met_port: int | None = None      # our (sprayer) or the peer's (scanner) port that met
    acked: bool = False

    def summary(self) -> str:
        parts = []
        if self.sprayed_ports:
            parts.append(f"opened {self.sprayed_ports} port{'s' if self.sprayed_ports != 1 else ''} "
                         f"towards the peer ({self.sprays} datagrams)")
        if self.probes:
            parts.append(f"sent {self.probes} probe{'s' if self.probes != 1 else ''} to random "
                         f"ports of the peer")
        return " and ".join(parts) or "sent nothing"


class FirstSyn:
    """A listener firewall admitting exactly one connection: the first SYN
    it is asked about.  Past the engine's half-open bounds that SYN is
    answered with a stateless cookie and the connection is created only
    when the cookie comes back, so the firewall is asked twice (and again
    for each retransmission of the SYN): it admits the same SYN -- same
    address, same connection id (Endpoint.admission_query) -- until the
    connection exists, and refuses every other SYN (the peer's later
    connection attempts get a RESET, as without cookies)."""

    def __init__(self, ep: Endpoint) -> None:
        self._ep = ep
        self._syn: tuple[Any, int] | None = None
        self._created = False

    @property
    def admitted(self) -> bool:
        """Whether a SYN was admitted (with a cookie, perhaps not created yet)."""
        return self._syn is not None

    def __call__(self, addr: Any) -> bool:
        stage, conn_id = self._ep.admission_query or ("syn", 0)
        syn = (_addr_key(addr), conn_id)
        if self._syn is None:
            self._syn = syn
        elif self._created or syn != self._syn:
            return False
        if stage != "cookie_syn":
            self._created = True
        return True


async def birthday(ep: Endpoint, peer: tuple[Any, ...], queue: DatagramQueue | None, *,
                   end: float, spray: bool, scan: bool, initiator: bool,
                   limits: BirthdayLimits, open_ttl: int | None,
                   log: Callable[[str], None], why: str, start: float | None = None,
                   direct_sent: int = 0, scan_delay: float = 0.0) -> UTPStream:
    """Run birthday probing towards ``peer`` until a connection or ``end``.
    ``spray``/``scan`` pick the roles (module docs); ``why`` says how it
    came to this, for the error message; ``start`` is when punching began
    and ``direct_sent`` what it sent before this (for the reports);
    ``scan_delay``: how long the peer may still take to get here (and open
    its ports): scans wait that long."""
    began = trio.current_time()
    if start is None:
        start = began
    report = _Report()
    roles = " and ".join(r for r, on in (("spraying", spray), ("scanning", scan)) if on)
    log(f"birthday probing towards {_format_peer(peer)} ({roles}; up to {limits.ports} ports, "
        f"{limits.max_probes} probes at {limits.rate:g}/s): {why}")
    result: list[UTPStream] = []
    sprayer_met = trio.Event()
    scan_done = trio.Event()
    listener = None
    gate = FirstSyn(ep)
    if scan:
        # The peer's IP only (Endpoint.claim_incoming): an application
        # listener on this Endpoint keeps the other connections.
        listener = ep.claim_incoming(lambda addr: _same_ip(addr, peer), backlog=1)

        def firewall(addr: Any) -> bool:
            # One connection: the first SYN from the peer's IP -- unless we
            # met as the sprayer too and win the tie-break (module docs).
            if sprayer_met.is_set() and initiator:
                return False
            return gate(addr)

        listener.firewall = firewall
    socks: list[Any] = []
    adopted: list[Any] = []     # the socket that met: the stream's Endpoint owns it
    try:
        with trio.move_on_at(end):
            async with unwrapped(), trio.open_nursery() as nursery:
                if spray:
                    socks = _open_sockets(ep, peer, limits.ports)
                    report.sprayed_ports = len(socks)
                    nursery.start_soon(_spray, socks, adopted, peer, limits, open_ttl, report)
                    for s in socks:
                        nursery.start_soon(_watch_socket, ep, s, socks, adopted, peer, end,
                                           report, sprayer_met, result, nursery, log)
                if scan:
                    assert listener is not None
                    nursery.start_soon(_scan, ep, peer, limits, report, scan_done, scan_delay)
                    if queue is not None:
                        nursery.start_soon(_read_acks, queue, peer, report, scan_done, log)

                    async def accept() -> None:
                        assert listener is not None
                        stream = await listener.accept()
                        if not result:
                            result.append(stream)
                            nursery.cancel_scope.cancel()
                        else:
                            await stream.aclose()
                    nursery.start_soon(accept)

                    async def cap() -> None:
                        await scan_done.wait()
                        if report.acked or spray:
                            return  # met (or still spraying): the deadline bounds it
                        await trio.sleep(limits.grace)
                        nursery.cancel_scope.cancel()
                    nursery.start_soon(cap)
    finally:
        if listener is not None:
            listener._shutdown()
        for s in socks:
            if s not in adopted:
                s.close()
    now = trio.current_time()
    elapsed, total = now - began, now - start
    if result:
        stream = result[0]
        n = report.met_probe
        sent = direct_sent + report.sprays + report.probes
        log(f"birthday probing connected after {elapsed:.2f} s ({total:.2f} s of punching): "
            f"probe #{n if n else '?'} met; {sent} datagrams sent ({report.summary()}, "
            f"{direct_sent} before in the direct phase)")
        stream.birthday_probes = n  # type: ignore[attr-defined]
        stream.punch_packets = sent  # type: ignore[attr-defined]
        return stream
    capped = scan and report.probes >= limits.max_probes and not spray
    what = (f"birthday probing {report.summary()} in {elapsed:.1f} s"
            + (f" (the cap of {limits.max_probes} probes)" if capped else "")
            + (f"; the peer acknowledged probe #{report.met_probe} but its uTP connection "
               f"never arrived" if report.acked else "; no pair of ports met"))
    hint = ("both NATs are likely symmetric (a new port per destination), which hole punching "
            "cannot cross: use port mapping or a relay") if (spray and scan) else \
        (f"none of the peer's probes reached our {report.sprayed_ports} ports: the peer's NAT "
         f"is likely symmetric too, which hole punching cannot cross: use port mapping or a "
         f"relay" if spray else
         "the peer's NAT may not be symmetric after all, or it filters its sprayed ports")
    how = f"gave up after {total:.1f} s" if capped else f"timed out after {total:.1f} s"
    message = f"hole punching to {_format_peer(peer)} {how}: {why}; {what}; {hint}"
    if capped:
        raise NATTraversalError(message)
    raise TimeoutError(message)


def _same_ip(a: Any, b: Any) -> bool:
    try:
        return normalize_ip(a[0]) == normalize_ip(b[0])
    except (ValueError, TypeError, IndexError):
        return False


def _family_for(ep: Endpoint, peer: Any) -> tuple[int, str]:
    local = ep.local_address
    ip = normalize_ip(peer[0])
    if ip.version == 4:
        bound = normalize_ip(local[0])
        host = str(bound) if bound.version == 4 and not bound.is_unspecified else "0.0.0.0"
        return _socket.AF_INET, host
    bound = normalize_ip(local[0])
    return _socket.AF_INET6, str(bound) if not bound.is_unspecified else "::"


def _open_sockets(ep: Endpoint, peer: Any, count: int) -> list[Any]:
    family, host = _family_for(ep, peer)
    socks: list[Any] = []
    try:
        for _ in range(count):
            try:
                s = trio.socket.socket(family, _socket.SOCK_DGRAM)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE) and socks:
                    break  # as many as the process may open
                raise
            socks.append(s)
            s._sock.bind((host, 0))
    except BaseException:
        for s in socks:
            s.close()
        raise
    return socks


def _target(peer: Any, family: int) -> tuple[str, int]:
    ip = normalize_ip(peer[0])
    if family == _socket.AF_INET6 and ip.version == 4:
        return (f"::ffff:{ip}", int(peer[1]))
    return (str(ip), int(peer[1]))


async def _spray(socks: list[Any], adopted: list[Any], peer: Any, limits: BirthdayLimits,
                 ttl: int | None, report: _Report) -> None:
    """Open (and refresh) one mapping per socket towards the peer."""
    pacer = _Pacer(limits.spray_rate)
    while True:
        for s in list(socks):
            if s.fileno() < 0 or s in adopted:
                continue
            await pacer.wait()
            if ttl is not None:
                _set_ttl(s, s.family, ttl)
            try:
                s._sock.sendto(_datagram(_OPEN, 0), _target(peer, s.family))
                report.sprays += 1
            except OSError:
                pass  # a full buffer or an ICMP error: the next round retries
        await trio.sleep(limits.refresh)


async def _watch_socket(ep: Endpoint, sock: Any, socks: list[Any], adopted: list[Any], peer: Any,
                        end: float, report: _Report, met: trio.Event, result: list[UTPStream],
                        nursery: trio.Nursery, log: Callable[[str], None]) -> None:
    """Wait for a scan probe on one sprayed socket; the first to get one
    becomes the connection's Endpoint (module docs)."""
    while True:
        try:
            data, addr = await sock.recvfrom(64)
        except trio.ClosedResourceError:
            return  # another socket met: this one was closed
        except OSError:
            if sock.fileno() < 0:
                return
            continue  # ICMP errors from the low-TTL sprays land here
        parsed = _parse(data)
        if parsed is None or parsed[0] != _PROBE or not _same_ip(addr, peer) or met.is_set():
            continue
        met.set()
        n = parsed[1]
        report.met_probe = n
        report.met_port = sock.getsockname()[1]
        _set_ttl(sock, sock.family, 64)
        for _ in range(3):  # the peer may stop scanning on the first that arrives
            try:
                sock._sock.sendto(_datagram(_ACK, n), addr)
            except OSError:
                pass
        log(f"birthday probing: the peer's probe #{n} reached our sprayed socket (local port "
            f"{report.met_port}) from {_format_peer(addr)}; connecting from there")
        for s in socks:
            if s is not sock:
                s.close()
        adopted.append(sock)
        try:
            stream = await _connect_from(ep, sock, (addr[0], addr[1]), end)
        except OSError as exc:  # refused (the peer took another meeting) or timed out
            log(f"birthday probing: the uTP connection from the port that met failed: {exc}")
            return
        if not result:
            result.append(stream)
            nursery.cancel_scope.cancel()
        else:
            await stream.aclose()
        return


async def _connect_from(ep: Endpoint, sock: Any, addr: tuple[Any, ...], end: float) -> UTPStream:
    """A uTP connection to ``addr`` from ``sock``, which becomes an Endpoint
    that belongs to the stream."""
    from ._api import adopt_socket

    return await adopt_socket(ep, sock, addr, deadline=end)


async def _scan(ep: Endpoint, peer: Any, limits: BirthdayLimits, report: _Report,
                done: trio.Event, delay: float) -> None:
    # A probe sent before the peer's ports are open is wasted (each port is
    # probed once): wait out how much later the peer may get here.
    await trio.sleep(delay)
    ports = list(range(_FIRST_PORT, 65536))
    random.SystemRandom().shuffle(ports)
    pacer = _Pacer(limits.rate)
    ip = str(normalize_ip(peer[0]))
    try:
        for port in ports[:limits.max_probes]:
            if report.acked:
                return
            await pacer.wait()
            report.probes += 1
            await ep.sendto(_datagram(_PROBE, report.probes), (ip, port))
    finally:
        done.set()


async def _read_acks(queue: DatagramQueue, peer: Any, report: _Report, done: trio.Event,
                     log: Callable[[str], None]) -> None:
    async for data, addr in queue:
        parsed = _parse(data)
        if parsed is None or parsed[0] != _ACK or not _same_ip(addr, peer) or report.acked:
            continue
        report.acked = True
        report.met_probe = parsed[1]
        report.met_port = int(addr[1])
        log(f"birthday probing: our probe #{parsed[1]} met the peer's port {addr[1]} "
            f"({report.probes} probes sent so far); waiting for its uTP connection")
        done.set()

