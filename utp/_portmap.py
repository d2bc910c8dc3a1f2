"""Port mapping: ask the home gateway to forward a public port to our
Endpoint, with PCP (RFC 6887), NAT-PMP (RFC 6886) or UPnP IGD.

Why: hole punching needs both peers and a rendezvous, and fails between
some NAT kinds; a gateway that forwards a port lets any peer reach us
directly, like a host on the internet.  So when enabled (``ucat --map``),
a mapping is tried first and punching stays the fallback.

How: :func:`port_mapping` tries the protocols in the order given:

- PCP and NAT-PMP go to the gateway's UDP port 5351 from a socket of our
  own (both RFCs let a client send from any port; the mapping names the
  Endpoint's port as the internal one).  The gateway is the default
  route's gateway from /proc/net/route unless one is given.  PCP comes
  first; a NAT-PMP-only gateway answers it with "unsupported version",
  and we fall back to NAT-PMP at once.  The messages and schedules are in
  :mod:`utp._portmap_codec` (sans-I/O).
- UPnP IGD uses miniupnpc's Python binding (the reference client, kept up
  by the author of miniupnpd and packaged as manylinux wheels): SSDP
  discovery, then SOAP AddPortMapping.  It blocks, so every call runs in a
  worker thread.

The mapped address is given to the Endpoint (:meth:`Endpoint.set_mapped_address`),
which then reports it as its ``external_address``: the gateway's word is
authoritative where peers' reports are only votes.  A background task
renews the lease at half its lifetime (and re-creates it at once when the
gateway's epoch shows it restarted); leaving the ``async with`` deletes
the mapping (lifetime 0, or DeletePortMapping), shielded and bounded.

Gateway announcements: a PCP or NAT-PMP gateway that restarts (and forgot
every mapping) or gets a new external address says so to the LAN, a
NAT-PMP external address answer and a PCP ANNOUNCE multicast to
224.0.0.1:5350 (RFC 6886 section 3.2.1, RFC 6887 section 14.1.3).  Without
listening, a mapping would be dead until its next renewal, up to half a
lease (an hour by default).  So while a PCP or NAT-PMP mapping lives we
listen there (SO_REUSEADDR: every mapping on the host hears it), and an
announcement from the gateway's address renews at once -- after a random
wait of up to ``ANNOUNCE_SPREAD`` seconds, as RFC 6887 asks, so a LAN full
of clients does not answer a reboot all in the same instant; the renewal
re-creates the mapping and picks up a new external address.  Count in
``mapping.announcements``.  A host where the port cannot be bound keeps
the mapping and says why in ``mapping.failures``.

IPv6: given an IPv6 ``gateway``, PCP asks it for a firewall pinhole to
our own address and port (RFC 6887 MAP over IPv6; the "external" address
is then our global one).  Tested against a PCP server of the tests' own on
::1 only -- the lab has no IPv6 --, and without announcements (those come
to ff02::1, not listened to).

What it is not: PCP PEER, UPnP IGDv2's WANIPv6FirewallControl pinholes,
the IPv6 default gateway found by itself, or a UPnP implementation of our
own.
"""

from __future__ import annotations

import contextlib
import ipaddress
import math
import os
import random
import struct
from urllib.parse import urlsplit
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Iterable, Iterator, Sequence

import trio

from . import _portmap_codec as codec
from ._portmap_codec import PortMapProtocolError, VersionNotSupported

__all__ = ["PortMapping", "PortMappingError", "port_mapping", "default_gateway"]

PROTOCOLS = ("pcp", "natpmp", "upnp")
_DELETE_TIMEOUT = 3.0
# RFC 6887 section 14.1.3: renew within a random 0..5 s of an ANNOUNCE.
ANNOUNCE_SPREAD = 5.0


class PortMappingError(OSError):
    """No protocol could map the port; the message names each protocol
    tried and why it failed."""


@dataclass
class PortMapping:
    """A live port mapping (see :func:`port_mapping`).

    ``external_address`` is the public ``(ip, port)`` that reaches the
    Endpoint's UDP port; ``tcp_external_address`` the one for ``tcp_port``
    when that was asked for.  ``renewals`` counts successful renewals,
    ``lifetime`` is the lease the gateway granted last (0: permanent,
    UPnP only)."""

    protocol: str
    gateway: str
    internal_port: int
    external_address: tuple[str, int]
    tcp_external_address: tuple[str, int] | None = None
    lifetime: int = 0
    renewals: int = 0
    failures: list[str] = field(default_factory=list)
    announcements: int = 0   # gateway announcements (restart, new address) that made us renew


def default_gateway(route_file: str = "/proc/net/route") -> str:
    """The IPv4 gateway of the default route (Linux's /proc/net/route),
    or raise PortMappingError."""
    try:
        with open(route_file) as f:
            lines = f.read().splitlines()[1:]
    except OSError as exc:
        raise PortMappingError(f"cannot read the routing table {route_file}: {exc}") from None
    best: tuple[int, str] | None = None
    for line in lines:
        cols = line.split()
        if len(cols) < 8:
            continue
        try:
            dest, gw, flags, metric = int(cols[1], 16), int(cols[2], 16), int(cols[3], 16), int(cols[6])
        except ValueError:
            continue
        if dest != 0 or not flags & 0x2 or not flags & 0x1:   # RTF_GATEWAY, RTF_UP
            continue
        ip = str(ipaddress.IPv4Address(struct.pack("<I", gw)))
        if best is None or metric < best[0]:
            best = (metric, ip)
    if best is None:
        raise PortMappingError(f"no default route with a gateway in {route_file}: "
                               f"give the gateway explicitly")
    return best[1]


# ---- PCP and NAT-PMP over UDP ------------------------------------------------------------

class _GatewaySocket:
    """A UDP socket connected to gateway:5351 (so only its answers arrive)."""

    def __init__(self, gateway: str, port: int) -> None:
        family = trio.socket.AF_INET6 if _is_ipv6(gateway) else trio.socket.AF_INET
        self.sock = trio.socket.socket(family, trio.socket.SOCK_DGRAM)
        self.gateway = gateway
        self.port = port

    async def open(self) -> str:
        await self.sock.connect((self.gateway, self.port))
        return self.sock.getsockname()[0]

    async def exchange(self, request: bytes, delays: Iterable[float], deadline: float,
                       accept: Callable[[bytes], Any]) -> Any:
        """Send ``request`` on the retransmission schedule until ``accept``
        returns an answer (not None) or ``deadline`` passes (TimeoutError).
        ``accept`` may raise; what it drops (PortMapProtocolError) is
        ignored, as an answer to a retransmission or a stray packet."""
        sent = 0
        for delay in delays:
            if trio.current_time() >= deadline:
                break
            try:
                await self.sock.send(request)
            except OSError as exc:
                # ICMP port unreachable from an earlier send: no server.
                raise ConnectionRefusedError(f"{self.gateway}:{self.port} refused ({exc})") from None
            sent += 1
            with trio.move_on_at(min(deadline, trio.current_time() + delay)):
                while True:
                    try:
                        data = await self.sock.recv(1500)
                    except ConnectionRefusedError:
                        raise ConnectionRefusedError(
                            f"{self.gateway}:{self.port} answered with ICMP port unreachable "
                            f"(no port mapping service there)") from None
                    try:
                        answer = accept(data)
                    except VersionNotSupported:
                        raise
                    except PortMapProtocolError:
                        continue
                    if answer is not None:
                        return answer
        raise TimeoutError(f"no answer from {self.gateway}:{self.port} after {sent} requests")

    def close(self) -> None:
        self.sock.close()


def _is_ipv6(address: str) -> bool:
    try:
        return ipaddress.ip_address(address.split("%", 1)[0]).version == 6
    except ValueError:
        return False


class _UdpMapper:
    """Shared renewal logic of the PCP and NAT-PMP clients."""

    name = ""

    def __init__(self, gateway: str, port: int, timeout: float) -> None:
        self.gw = _GatewaySocket(gateway, port)
        self.timeout = timeout
        self.client_ip = ""
        self.epoch: tuple[int, float] | None = None
        self.gateway = gateway
        self.external_ip_seen = ""

    async def begin(self) -> str:
        """Open the socket (learning our source address for PCP); returns
        the external address when the protocol has a request for it."""
        self.client_ip = await self.gw.open()
        return ""

    async def map(self, protocol: str, internal: int, external: int,
                  lifetime: int) -> tuple[int, int, bool]:
        """Map (lifetime 0: delete); returns (external port, granted
        lifetime, whether the gateway restarted since the last answer)."""
        raise NotImplementedError

    def check_epoch(self, epoch: int) -> bool:
        """Record the gateway's epoch; True if it restarted since the last."""
        now = trio.current_time()
        went_back = self.epoch is not None and codec.epoch_went_back(*self.epoch, epoch, now)
        self.epoch = (epoch, now)
        return went_back

    def close(self) -> None:
        self.gw.close()


class _NatPmp(_UdpMapper):
    name = "natpmp"

    async def begin(self) -> str:
        await super().begin()
        return await self.external_ip()

    async def external_ip(self) -> str:
        def accept(data: bytes) -> codec.NatPmpExternalAddress | None:
            ans = codec.decode_natpmp_untrusted(data)
            return ans if isinstance(ans, codec.NatPmpExternalAddress) else None

        ans = await self.gw.exchange(codec.encode_natpmp_external_address(),
                                     self._delays(), trio.current_time() + self.timeout, accept)
        if ans.result:
            raise PortMappingError(f"NAT-PMP external address request to {self.gw.gateway}: "
                                   f"{codec.result_message('natpmp', ans.result)}")
        self.check_epoch(ans.epoch)
        return ans.address

    def _delays(self) -> Iterator[float]:
        return codec.natpmp_retransmit_delays()

    async def map(self, protocol: str, internal: int, external: int, lifetime: int) -> tuple[int, int, bool]:
        """Returns (external port, lifetime, gateway restarted)."""
        def accept(data: bytes) -> codec.NatPmpMapping | None:
            ans = codec.decode_natpmp_untrusted(data)
            if (isinstance(ans, codec.NatPmpMapping) and ans.protocol == protocol
                    and ans.internal_port == internal):
                return ans
            return None

        req = codec.encode_natpmp_map(protocol, internal, external if lifetime else 0, lifetime)
        ans = await self.gw.exchange(req, self._delays(), trio.current_time() + self.timeout, accept)
        if ans.result:
            raise PortMappingError(f"NAT-PMP {protocol.upper()} mapping of port {internal} at "
                                   f"{self.gw.gateway}: {codec.result_message('natpmp', ans.result)}")
        return ans.external_port, ans.lifetime, self.check_epoch(ans.epoch)


class _Pcp(_UdpMapper):
    name = "pcp"

    def __init__(self, gateway: str, port: int, timeout: float) -> None:
        super().__init__(gateway, port, timeout)
        # One nonce per mapping, kept for renewing and deleting it.
        self.nonces: dict[tuple[str, int], bytes] = {}

    async def map(self, protocol: str, internal: int, external: int, lifetime: int) -> tuple[int, int, bool]:
        nonce = self.nonces.setdefault((protocol, internal), os.urandom(12))

        def accept(data: bytes) -> codec.PcpMapping | None:
            ans = codec.decode_pcp_untrusted(data)
            # RFC 6887 section 11.4: an answer whose nonce, protocol or
            # internal port differ is not ours.
            if ans.nonce != nonce or ans.protocol != protocol or ans.internal_port != internal:
                return None
            return ans

        # IPv6 (RFC 6887 section 11.1): no address to suggest is all zeros;
        # the gateway opens a firewall pinhole to our own address.
        req = codec.encode_pcp_map(nonce=nonce, protocol=protocol, internal_port=internal,
                                   client_ip=self.client_ip.split("%", 1)[0], lifetime=lifetime,
                                   external_port=external if lifetime else 0,
                                   external_ip="::" if _is_ipv6(self.client_ip) else "0.0.0.0")
        ans = await self.gw.exchange(req, codec.pcp_retransmit_delays(),
                                     trio.current_time() + self.timeout, accept)
        if ans.result:
            raise PortMappingError(f"PCP {protocol.upper()} mapping of port {internal} at "
                                   f"{self.gw.gateway}: {codec.result_message('pcp', ans.result)}")
        self.external_ip_seen = ans.external_ip
        return ans.external_port, ans.lifetime, self.check_epoch(ans.epoch)


# ---- UPnP IGD through miniupnpc ---------------------------------------------------------

class _Upnp:
    """miniupnpc in worker threads.  Discovery multicasts an SSDP M-SEARCH
    (TTL 2) on the LAN; everything after it is HTTP to the IGD found."""

    name = "upnp"

    def __init__(self, timeout: float, description: str) -> None:
        self.timeout = timeout
        self.description = description
        self.igd: Any = None
        self.lanaddr = ""
        self.permanent: set[tuple[str, int]] = set()
        self.gateway = ""             # the IGD's host, from its control URL
        self.external_ip_seen = ""

    async def _call(self, fn: Callable[..., Any], *args: Any) -> Any:
        # miniupnpc's own socket timeouts bound each call; this bounds the
        # whole, and a call past it is abandoned to its thread.
        limit = self.timeout + 5
        try:
            with trio.fail_after(limit):
                return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)
        except trio.TooSlowError:
            raise PortMappingError(f"UPnP: {_name(fn)} took longer than {limit:g} s") from None
        except PortMappingError:
            raise
        except Exception as exc:
            # miniupnpc raises plain Exception with the UPnP error's text
            # (or "Success" when the search found nothing).
            raise PortMappingError(f"UPnP: {_name(fn)} failed: {exc}") from None

    async def begin(self) -> str:
        """Find the IGD; returns its external IP address."""
        try:
            import miniupnpc  # type: ignore[import-not-found]
        except ImportError as exc:
            raise PortMappingError(f"UPnP needs the miniupnpc package ({exc})") from None

        def find() -> tuple[Any, str, str, str]:
            igd = miniupnpc.UPnP()
            # The search goes through up to 4 device types, waiting this
            # long for each while nothing answers.
            igd.discoverdelay = max(100, int(self.timeout * 1000 / 4))
            try:
                found = igd.discover()
            except Exception:
                found = 0
            if found == 0:
                raise PortMappingError("UPnP: no device answered the SSDP search")
            try:
                url = igd.selectigd()
            except Exception as exc:
                raise PortMappingError(f"UPnP: no usable Internet Gateway Device ({exc})") from None
            return igd, igd.lanaddr, igd.externalipaddress(), str(url)

        self.igd, self.lanaddr, ext, url = await self._call(find)
        self.gateway = urlsplit(url).hostname or url
        if not ext:
            raise PortMappingError("UPnP: the gateway reports no external IP address")
        return str(ext)

    async def map(self, protocol: str, internal: int, external: int, lifetime: int) -> tuple[int, int, bool]:
        proto = protocol.upper()
        key = (protocol, internal)
        lease = 0 if key in self.permanent else lifetime

        def add() -> tuple[int, int]:
            nonlocal lease
            port = external or internal
            try:
                self.igd.addportmapping(port, proto, self.lanaddr, internal, self.description, "", lease)
                return port, lease
            except Exception as exc:
                text = str(exc)
            if "725" in text or "OnlyPermanentLeases" in text:
                # An IGDv1 that takes only permanent leases: we delete it on exit.
                self.permanent.add(key)
                self.igd.addportmapping(port, proto, self.lanaddr, internal, self.description, "", 0)
                return port, 0
            if "718" in text or "Conflict" in text:
                got = self.igd.addanyportmapping(port, proto, self.lanaddr, internal,
                                                 self.description, "", lease)
                return int(got), lease
            raise PortMappingError(f"UPnP AddPortMapping {proto} {port} -> {self.lanaddr}:{internal}: {text}")

        port, granted = await self._call(add)
        return port, granted, False

    async def unmap(self, protocol: str, external: int) -> None:
        await self._call(self.igd.deleteportmapping, external, protocol.upper())

    def close(self) -> None:
        self.igd = None


def _name(fn: Callable[..., Any]) -> str:
    return {"find": "discovery", "add": "AddPortMapping"}.get(fn.__name__, fn.__name__)


# ---- the public context manager -----------------------------------------------------------

async def _start(name: str, endpoint: Any, gateway: str | None, tcp_port: int | None,
                 lifetime: int, timeout: float, server_port: int,
                 description: str) -> tuple[Any, PortMapping]:
    internal = endpoint.local_address[1]
    client: _Upnp | _UdpMapper
    if name == "upnp":
        client = _Upnp(timeout, description)
    else:
        gw = gateway or default_gateway()
        if name == "natpmp" and _is_ipv6(gw):
            raise PortMappingError(f"NAT-PMP is IPv4 only; the gateway {gw} is IPv6 (use PCP)")
        client = _Pcp(gw, server_port, timeout) if name == "pcp" else _NatPmp(gw, server_port, timeout)
    try:
        ext_ip = await client.begin()
        port, granted, _ = await client.map("udp", internal, internal, lifetime)
        ext_ip = client.external_ip_seen or ext_ip     # PCP learns it from MAP
        mapping = PortMapping(name, client.gateway, internal, (ext_ip, port), lifetime=granted)
        if tcp_port is not None:
            tport, _, _ = await client.map("tcp", tcp_port, tcp_port, lifetime)
            mapping.tcp_external_address = (ext_ip, tport)
    except BaseException:
        client.close()
        raise
    return client, mapping


def _renew_delay(lifetime: int) -> float:
    # RFC 6886 section 3.3 / RFC 6887 section 11.2.1: renew at half the
    # lifetime (never more often than every second).
    return max(1.0, lifetime / 2) if lifetime else math.inf


async def _listen_announcements(gateway: str, wake: trio.MemorySendChannel[codec.Announcement],
                                mapping: PortMapping,
                                task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
    """Pass on what the gateway multicasts to 224.0.0.1:5350 (module docs)."""
    sock = trio.socket.socket(trio.socket.AF_INET, trio.socket.SOCK_DGRAM)
    with sock:
        try:
            sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_REUSEADDR, 1)
            await sock.bind((codec.ANNOUNCE_GROUP, codec.ANNOUNCE_PORT))
        except OSError as exc:
            mapping.failures.append(f"cannot listen for the gateway's announcements on "
                                    f"{codec.ANNOUNCE_GROUP}:{codec.ANNOUNCE_PORT}: {exc}")
            task_status.started()
            return
        # 224.0.0.1 is all hosts: every multicast interface is in it already.
        task_status.started()
        while True:
            data, addr = await sock.recvfrom(1500)
            if addr[0] != gateway:
                continue   # only our gateway's word counts
            try:
                ann = codec.decode_announcement_untrusted(data)
            except PortMapProtocolError:
                continue
            try:
                wake.send_nowait(ann)
            except trio.WouldBlock:
                pass       # a renewal is already due


async def _renew_loop(client: Any, mapping: PortMapping, endpoint: Any, tcp_port: int | None,
                      lifetime: int,
                      announced: trio.MemoryReceiveChannel[codec.Announcement] | None = None) -> None:
    expires = trio.current_time() + mapping.lifetime if mapping.lifetime else math.inf
    wait = _renew_delay(mapping.lifetime)
    while True:
        heard = False
        with trio.move_on_after(wait):
            if announced is None:
                await trio.sleep_forever()
            await announced.receive()
            heard = True
            mapping.announcements += 1
            await trio.sleep(random.uniform(0, ANNOUNCE_SPREAD))
        try:
            port, granted, restarted = await client.map("udp", mapping.internal_port,
                                                        mapping.external_address[1], lifetime)
            if tcp_port is not None and mapping.tcp_external_address is not None:
                tport, _, _ = await client.map("tcp", tcp_port, mapping.tcp_external_address[1],
                                               lifetime)
                mapping.tcp_external_address = (mapping.tcp_external_address[0], tport)
            ext_ip = client.external_ip_seen or mapping.external_address[0]
            if restarted:
                # The gateway lost its state (the map above re-created it).
                mapping.failures.append("gateway restarted (its epoch went back); mapping re-created")
            if (restarted or heard) and isinstance(client, _NatPmp):
                ext_ip = await client.external_ip()   # it may have a new external address
        except (OSError, PortMapProtocolError) as exc:
            mapping.failures.append(f"renewal failed: {exc}")
            if trio.current_time() >= expires:
                endpoint.set_mapped_address(None)   # the lease ran out: no longer reachable
            # Retry sooner, while the old lease still runs.
            wait = max(1.0, wait / 2)
            continue
        mapping.external_address = (ext_ip, port)
        mapping.lifetime = granted
        mapping.renewals += 1
        expires = trio.current_time() + granted if granted else math.inf
        wait = _renew_delay(granted)
        endpoint.set_mapped_address(mapping.external_address)


async def _delete(client: Any, mapping: PortMapping, tcp_port: int | None) -> None:
    with trio.move_on_after(_DELETE_TIMEOUT) as scope:
        scope.shield = True
        try:
            if isinstance(client, _Upnp):
                await client.unmap("udp", mapping.external_address[1])
                if mapping.tcp_external_address is not None:
                    await client.unmap("tcp", mapping.tcp_external_address[1])
            else:
                await client.map("udp", mapping.internal_port, 0, 0)
                if tcp_port is not None:
                    await client.map("tcp", tcp_port, 0, 0)
        except Exception as exc:   # OSError, PortMapProtocolError, PortMappingError
            mapping.failures.append(f"deleting the mapping failed: {exc}")


@contextlib.asynccontextmanager
async def port_mapping(endpoint: Any, protocols: Sequence[str] = PROTOCOLS, tcp_port: int | None = None,
                       *, gateway: str | None = None, lifetime: int = 7200, timeout: float = 2.0,
                       server_port: int = codec.SERVER_PORT,
                       description: str = "utpkit") -> AsyncIterator[PortMapping]:
    """Map the Endpoint's UDP port (and ``tcp_port``, e.g. a BitTorrent
    listener, when given) at the gateway, keep it renewed while the block
    runs, and delete it on exit.

    ``protocols`` are tried in order ("pcp", "natpmp", "upnp"); the first
    that maps wins.  ``gateway`` overrides the default route's gateway for
    PCP and NAT-PMP (``server_port`` their port, 5351); an IPv6 gateway
    makes PCP ask for an IPv6 firewall pinhole (module docs; NAT-PMP has
    no IPv6 and says so); ``lifetime`` is the
    lease asked for, in seconds; ``timeout`` bounds each protocol's attempt
    (and each renewal).  The mapped UDP address becomes the Endpoint's
    ``external_address`` until the block ends.

    Error handling: raises :class:`PortMappingError` naming every protocol
    tried and its failure when none maps; renewal failures are recorded in
    ``mapping.failures`` and retried, never raised into the block.

    Cancellation: the deletion on exit runs shielded, bounded by 3 s.
    """
    for name in protocols:
        if name not in PROTOCOLS:
            raise ValueError(f"unknown port mapping protocol {name!r}; choose from {PROTOCOLS}")
    if not protocols:
        raise ValueError("port_mapping needs at least one protocol")
    if not 0 < lifetime <= 0xFFFFFFFF:
        raise ValueError(f"lifetime must be a positive number of seconds, not {lifetime}")
    failures: list[str] = []
    started: tuple[Any, PortMapping] | None = None
    order = list(protocols)
    i = 0
    while i < len(order):
        name = order[i]
        i += 1
        try:
            started = await _start(name, endpoint, gateway, tcp_port, lifetime, timeout,
                                   server_port, description)
            break
        except VersionNotSupported as exc:
            failures.append(f"{name}: {exc}")
            # RFC 6887 section 9: a NAT-PMP gateway; go to NAT-PMP next.
            if name == "pcp" and "natpmp" not in order[i:]:
                order.insert(i, "natpmp")
        except (OSError, PortMapProtocolError) as exc:
            failures.append(f"{name}: {exc}")
    if started is None:
        raise PortMappingError("port mapping failed: " + "; ".join(failures))
    client, mapping = started
    mapping.failures.extend(failures)
    endpoint.set_mapped_address(mapping.external_address)
    # The block's own exception is caught and re-raised outside the
    # nursery, so it reaches the caller as itself, not in an ExceptionGroup.
    raised: BaseException | None = None
    try:
        async with trio.open_nursery() as nursery:
            announced = None
            if isinstance(client, _UdpMapper) and not _is_ipv6(client.gateway):
                wake, announced = trio.open_memory_channel[codec.Announcement](1)
                await nursery.start(_listen_announcements, client.gateway, wake, mapping)
            nursery.start_soon(_renew_loop, client, mapping, endpoint, tcp_port, lifetime, announced)
            try:
                yield mapping
            except BaseException as exc:
                raised = exc
            finally:
                nursery.cancel_scope.cancel()
        if raised is not None:
            raise raised
    finally:
        endpoint.set_mapped_address(None)
        try:
            await _delete(client, mapping, tcp_port)
        finally:
            client.close()
