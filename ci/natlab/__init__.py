"""natlab -- real NATs for testing hole punching, built from network
namespaces, veth pairs and nftables (issue 5, DESIGN.md "Connecting across
NATs").

What it is: a :class:`Lab` builds, as root, an "internet" (one bridge in a
namespace of its own, addresses in 198.18.0.0/15, the range RFC 2544 sets
aside for benchmarks) with public hosts on it, and NAT routers with one
private host each (10.N.0.0/24) behind them.  NAT kinds, in nftables:

- ``none``: the host sits on the internet itself;
- ``full``: full cone, endpoint-independent mapping and filtering (a
  static, port-preserving SNAT and a DNAT of everything inbound);
- ``restricted``: port-restricted cone, Linux's ordinary ``masquerade``
  (replies only from the address and port we sent to);
- ``symmetric``: ``masquerade fully-random`` (iptables' random-fully), a
  new public port for every destination;
- ``answering`` (issue 10): port-restricted ``masquerade`` like
  ``restricted``, but with NO input firewall, like many Linux gateways,
  container hosts and some home routers: an unsolicited packet reaches the
  router's own stack, is answered with ICMP port unreachable and leaves an
  unreplied conntrack entry behind, so the host's own first packet to that
  peer gets a different public port.  Behind it sits one plain router (the
  ISP's), so a packet sent with a small IP TTL can open this NAT and expire
  before the other side's -- as on the real internet, where there is
  always a hop between two NATs.  Not part of :data:`NAT_KINDS` (the
  default matrix); see :data:`ALL_NAT_KINDS`.
- ``double`` (issue 10): a home NAT behind a carrier-grade NAT.  The host
  sits behind a home router (``restricted``: port-preserving
  ``masquerade``) whose WAN side is on the carrier's shared address space
  (100.64.N.0/24 of RFC 6598's 100.64.0.0/10), and the carrier's router
  masquerades that again to the public address.  Both drop unsolicited
  inbound packets; loss, if any, is on the home router.  From outside it
  behaves as a port-restricted cone NAT two hops deep: a NAT-opening
  probe with TTL 2 dies at the carrier's router without opening it, which
  its input firewall makes harmless.
- ``hairpin`` (issue 10): two hosts behind the same port-restricted
  masquerade that reach each other through its public address: the router
  does hairpin NAT ("NAT loopback"): a packet from the LAN to its own
  public address is forwarded back into the LAN, to the host that owns the
  destination port, with its source rewritten to the public address and
  the sender's port (so each host sees the other exactly as the internet
  does).  Linux has no rule for "the host whose mapping owns this port",
  so the lab gives each host its own range of local ports
  (``ip_local_port_range``: 20000-29999 for the first, 30000-39999 for
  the second; masquerade keeps them) and the router maps the ranges back:
  a real router looks the port up in its mapping table instead.  The
  first ``add_host(name, "hairpin")`` builds the router and one host, a
  second one with ``behind=`` that host adds the other.

``upnp`` (issue 10, :mod:`ci.natlab.upnp`): a ``restricted`` router that
also runs miniupnpd with NAT-PMP, PCP and UPnP IGD on its LAN side, for
port mapping; not a kind of the punching matrices (see
:data:`PORTMAP_KINDS`).

Optional random loss on a router (``numgen random mod 100 < N drop``, both
directions).  A loss figure means per datagram: N% of the IP packets the
router forwards, in each direction, independently of each other.  That
holds because every veth of the lab has its segmentation offloads off
(GSO, TSO, UDP segmentation, GRO; ``ethtool -K``): a sender's UDP GSO
super-packet (one ``sendmsg`` of up to 64 datagrams with ``UDP_SEGMENT``)
is cut into its datagrams when it leaves the sender's namespace, so the
router sees, counts and drops each datagram on its own.  With the offloads
on, such a super-packet crossed the veths as one skb and one drop removed
up to 64 datagrams at once (issue 12: a "5%" run dropped 4 of ~12,000).
The router's nft counters ``forwarded`` (every packet offered to the
forward hook) and ``lost`` (the ones the loss rule dropped) give the
measured figure: :meth:`Lab.loss_counters`.

Routers other than ``answering`` drop unsolicited inbound packets in their input
hook: a packet that reaches the router's own stack would otherwise leave a
conntrack entry behind that makes masquerade pick a different port for the
host's next outbound packet to that peer -- the real-world hole punching
failure of Linux routers that do answer with ICMP.

Interfaces are created directly inside the lab's namespaces, never in the
host's; the namespaces have no route to anything outside the lab.  Every
name carries a per-run prefix (``ulab<pid>x<random>``), so parallel runs do
not collide, and ``Lab`` is a context manager whose exit kills the
processes it started and deletes every namespace, also on errors and
KeyboardInterrupt; ``python -m ci.natlab cleanup`` removes what a killed
run left behind.

What it is not: an emulator of particular home routers, or anything that
touches the machine's real interfaces.

``python -m ci.natlab matrix`` runs ``ucat --rendezvous`` through a tracker
(or, with ``--via dht``, through a DHT node on the lab's internet) for every
pair of NAT kinds and prints a success matrix.
"""

from __future__ import annotations

import atexit
import ipaddress
import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

__all__ = ["Lab", "Host", "NAT_KINDS", "ALL_NAT_KINDS", "PORTMAP_KINDS", "LabError", "can_build",
           "cleanup_stale", "PREFIX"]

# The default matrix's kinds; ALL_NAT_KINDS adds the ones issue 10 brought.
NAT_KINDS = ("none", "full", "restricted", "symmetric")
ALL_NAT_KINDS = NAT_KINDS + ("answering", "double", "hairpin")
# Hairpin hosts' local port ranges (see the module docs), in the order added.
HAIRPIN_PORTS = ((20000, 29999), (30000, 39999))
# Routers with a port mapping server (ci/natlab/upnp.py), outside the matrices.
PORTMAP_KINDS = ("upnp",)
PREFIX = "ulab"
INTERNET = ipaddress.ip_network("198.18.0.0/15")


class LabError(RuntimeError):
    """Building the lab failed (the message has the command and its stderr)."""


def _run(cmd: Sequence[str], *, input: str | None = None, check: bool = True) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), input=input, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise LabError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr.strip()}")
    return proc


def _sysctl(ns: str, key: str, value: int, *, check: bool = True) -> None:
    """Set a sysctl inside namespace ``ns`` (through /proc/sys, so procps'
    sysctl is not needed; the namespace's own values, as ip netns exec
    mounts its /proc/sys view)."""
    path = "/proc/sys/" + key.replace(".", "/")
    _run(["ip", "netns", "exec", ns, "sh", "-c", f'echo {int(value)} > "$1"', "sh", path], check=check)


# Segmentation offloads of a veth: off, so that a GSO super-packet is cut
# into datagrams as it leaves its namespace and nft rules (the loss rule,
# counters) see every datagram on its own.  "tx-udp-segmentation" is UDP
# GSO; "gso"/"tso" the generic and TCP ones; "gro" would merge them again on
# receive.  Some kernels fix some of them: that is not an error as long as
# UDP segmentation itself ends up off (checked).
_OFFLOADS = ("tx-udp-segmentation", "gso", "tso", "gro", "rx-gro-list", "rx-udp-gro-forwarding")


def no_offloads(ns: str, ifname: str) -> None:
    """Turn the segmentation offloads of ``ifname`` in namespace ``ns`` off
    (see _OFFLOADS); raise LabError if UDP segmentation stays on."""
    ex = ["ip", "netns", "exec", ns, "ethtool"]
    args: list[str] = []
    for feature in _OFFLOADS:
        args += [feature, "off"]
    _run(ex + ["-K", ifname, *args], check=False)
    shown = _run(ex + ["-k", ifname]).stdout
    for line in shown.splitlines():
        name, _, value = line.strip().partition(":")
        if name in ("tx-udp-segmentation", "generic-segmentation-offload") and value.split()[:1] == ["on"]:
            raise LabError(f"ethtool could not turn {name} off on {ifname} in {ns}: {line.strip()}")


def _veth(ns1: str, if1: str, addr1: str, ns2: str, if2: str, addr2: str) -> None:
    """A veth pair from ``if1`` in ``ns1`` to ``if2`` in ``ns2``, offloads
    off, each end with its address (CIDR) and up."""
    _run(["ip", "-n", ns1, "link", "add", if1, "type", "veth", "peer", "name", if2, "netns", ns2])
    for ns, ifname, addr in ((ns1, if1, addr1), (ns2, if2, addr2)):
        no_offloads(ns, ifname)
        _run(["ip", "-n", ns, "addr", "add", addr, "dev", ifname])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])


def read_sysctl(ns: str, key: str) -> str:
    """A sysctl's value inside namespace ``ns``."""
    path = "/proc/sys/" + key.replace(".", "/")
    return _run(["ip", "netns", "exec", ns, "cat", path]).stdout.strip()


def can_build() -> str | None:
    """None if this process can build a lab, else why not (root, the ip and
    nft tools, network namespaces)."""
    if os.geteuid() != 0:
        return "the NAT lab needs root (network namespaces and nftables)"
    for tool, package in (("ip", "iproute2"), ("nft", "nftables"), ("ethtool", "ethtool")):
        if shutil.which(tool) is None:
            return f"the NAT lab needs {tool!r} (Debian package {package})"
    name = f"{PREFIX}{os.getpid()}xprobe{secrets.token_hex(2)}"
    proc = _run(["ip", "netns", "add", name], check=False)
    if proc.returncode != 0:
        return f"cannot create a network namespace: {proc.stderr.strip()}"
    _run(["ip", "netns", "del", name], check=False)
    return None


@dataclass
class Host:
    """One host of the lab: a namespace with an address."""

    lab: Lab
    name: str
    ns: str
    ip: str                       # its own address
    kind: str = "none"            # the NAT in front of it
    public_ip: str = ""           # the address the internet sees
    router_ns: str | None = None
    loss: int = 0
    procs: list[subprocess.Popen] = field(default_factory=list)

    def cmd(self, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns, *argv]

    # Commands run from a neutral directory: `python -m ucat` puts its working
    # directory first on sys.path, and the source tree's utp (without its
    # compiled module) must not shadow the installed one.
    def run(self, argv: Sequence[str], **kw: Any) -> subprocess.CompletedProcess:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("cwd", "/")
        return subprocess.run(self.cmd(argv), **kw)

    def popen(self, argv: Sequence[str], **kw: Any) -> subprocess.Popen:
        kw.setdefault("cwd", "/")
        proc = subprocess.Popen(self.cmd(argv), **kw)
        self.lab._procs.append(proc)
        return proc

    def router(self, argv: Sequence[str]) -> subprocess.CompletedProcess:
        """Run a command in this host's NAT router (e.g. ``conntrack -L``)."""
        if self.router_ns is None:
            raise LabError(f"{self.name} has no router")
        return subprocess.run(["ip", "netns", "exec", self.router_ns, *argv],
                              capture_output=True, text=True)


def _hairpin_rules(wan_ip: str, lan_net: str, hosts: Sequence[str]) -> tuple[str, str]:
    """Hairpin NAT (module docs): from the LAN to our public address, DNAT
    to the host that owns the port range, and SNAT to the public address
    (postrouting knows no input interface: the source net says LAN)."""
    pre = "\n    ".join(f'iifname "lan" ip daddr {wan_ip} meta l4proto {{ udp, tcp }} th dport '
                        f'{lo}-{hi} dnat to {ip}' for ip, (lo, hi) in zip(hosts, HAIRPIN_PORTS))
    post = f'ip saddr {lan_net} oifname "lan" ct status dnat snat to {wan_ip}'
    return pre, post


def _nft_ruleset(kind: str, wan_ip: str, lan_net: str, host_ip: str, loss: int,
                 hairpin_hosts: Sequence[str] = ()) -> str:
    nat = {
        "full": (f'iifname "wan" ip daddr {wan_ip} dnat to {host_ip}',
                 f'oifname "wan" ip saddr {lan_net} snat to {wan_ip}'),
        "restricted": ("", f'oifname "wan" ip saddr {lan_net} masquerade'),
        "symmetric": ("", f'oifname "wan" ip saddr {lan_net} masquerade fully-random'),
        "answering": ("", f'oifname "wan" ip saddr {lan_net} masquerade'),
        "double": ("", f'oifname "wan" ip saddr {lan_net} masquerade'),
        "hairpin": ("", f'oifname "wan" ip saddr {lan_net} masquerade'),
        "upnp": ("", f'oifname "wan" ip saddr {lan_net} masquerade'),
    }[kind]
    if kind == "hairpin":
        pre, post = _hairpin_rules(wan_ip, lan_net, hairpin_hosts)
        nat = (pre, nat[1] + "\n    " + post)
    lossy = f'numgen random mod 100 < {loss} counter name "lost" drop' if loss else ""
    # ``answering`` has no input firewall: the router's own stack answers
    # unsolicited packets (ICMP port unreachable) and conntrack keeps them.
    guard = "" if kind == "answering" else 'iifname "wan" ct state new counter drop'
    return f"""
table ip natlab {{
  counter forwarded {{ }}
  counter lost {{ }}
  chain prerouting {{
    type nat hook prerouting priority dstnat; policy accept;
    {nat[0]}
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat; policy accept;
    {nat[1]}
  }}
  chain input {{
    type filter hook input priority filter; policy accept;
    {guard}
  }}
  chain forward {{
    type filter hook forward priority filter; policy accept;
    counter name "forwarded"
    {lossy}
    iifname "wan" ct state new ct status dnat counter accept
    iifname "wan" ct state new counter drop
  }}
}}
"""


class Lab:
    """A NAT lab; use as a context manager (``with Lab() as lab:``)."""

    def __init__(self, *, udp_timeout: int | None = None) -> None:
        self.prefix = f"{PREFIX}{os.getpid()}x{secrets.token_hex(2)}"
        self.namespaces: list[str] = []
        self.hosts: dict[str, Host] = {}
        self._procs: list[subprocess.Popen] = []
        self._next_public = 10
        self._next_lan = 1
        self._bridge_port = 0
        self._tmpdirs: list[str] = []
        self.udp_timeout = udp_timeout
        self.miniupnpd: dict[str, Any] = {}   # host name -> upnp.MiniUpnpd
        self.internet: str | None = None
        self._closed = False

    # ---- life cycle --------------------------------------------------------------------

    def __enter__(self) -> Lab:
        atexit.register(self.close)
        try:
            self._build_internet()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Kill the lab's processes and delete its namespaces.  Idempotent."""
        if self._closed:
            return
        self._closed = True
        # SIGINT during teardown must not leave namespaces behind.
        old = signal.getsignal(signal.SIGINT)
        try:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        except ValueError:
            old = None  # not the main thread
        try:
            for proc in self._procs:
                if proc.poll() is None:
                    proc.terminate()
            for proc in self._procs:
                try:
                    proc.wait(3)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            for ns in reversed(self.namespaces):
                _kill_ns_pids(ns)
                _run(["ip", "netns", "del", ns], check=False)
            for d in self._tmpdirs:
                shutil.rmtree(d, ignore_errors=True)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)
            atexit.unregister(self.close)

    # ---- building ------------------------------------------------------------------------

    def _ns(self, role: str) -> str:
        name = f"{self.prefix}-{role}"
        _run(["ip", "netns", "add", name])
        self.namespaces.append(name)
        ex = ["ip", "netns", "exec", name]
        _run(ex + ["ip", "link", "set", "lo", "up"])
        # No IPv6 chatter (DAD, router solicitations) inside the lab.
        _sysctl(name, "net.ipv6.conf.all.disable_ipv6", 1, check=False)
        _sysctl(name, "net.ipv6.conf.default.disable_ipv6", 1, check=False)
        return name

    def _build_internet(self) -> None:
        self.internet = self._ns("inet")
        _run(["ip", "-n", self.internet, "link", "add", "br0", "type", "bridge"])
        no_offloads(self.internet, "br0")
        _run(["ip", "-n", self.internet, "link", "set", "br0", "up"])

    def _attach(self, ns: str, ifname: str, ip: str) -> None:
        """A veth from the internet's bridge to ``ns`` (as ``ifname``)."""
        assert self.internet is not None
        self._bridge_port += 1
        port = f"p{self._bridge_port}"
        _run(["ip", "-n", self.internet, "link", "add", port, "type", "veth",
              "peer", "name", ifname, "netns", ns])
        _run(["ip", "-n", self.internet, "link", "set", port, "master", "br0", "up"])
        no_offloads(self.internet, port)
        no_offloads(ns, ifname)
        _run(["ip", "-n", ns, "addr", "add", f"{ip}/15", "dev", ifname])
        _run(["ip", "-n", ns, "link", "set", ifname, "up"])

    def _attach_via_isp(self, name: str, rns: str, wan: str, n: int) -> None:
        """Connect router ``rns`` (public address ``wan``) to the internet
        through one plain forwarding router, the ISP's: it answers ARP for
        ``wan`` on the bridge (proxy ARP) and routes it down a point-to-point
        link, so the NAT keeps ``wan`` as its only address (masquerade picks
        it) and every packet between it and the internet crosses one more
        hop that decrements the TTL."""
        isp = self._ns(f"i-{name}")
        self._attach(isp, "uplink", self._public_ip())
        gw = f"100.127.{n}.1"
        _run(["ip", "-n", isp, "link", "add", "cust", "type", "veth", "peer", "name", "wan",
              "netns", rns])
        no_offloads(isp, "cust")
        no_offloads(rns, "wan")
        _run(["ip", "-n", isp, "addr", "add", f"{gw}/32", "dev", "cust"])
        _run(["ip", "-n", isp, "link", "set", "cust", "up"])
        _run(["ip", "-n", isp, "route", "add", f"{wan}/32", "dev", "cust"])
        for key, value in (("net.ipv4.ip_forward", 1), ("net.ipv4.conf.uplink.proxy_arp", 1),
                           ("net.ipv4.conf.all.rp_filter", 0), ("net.ipv4.conf.cust.rp_filter", 0),
                           ("net.ipv4.conf.uplink.rp_filter", 0)):
            _sysctl(isp, key, value)
        _run(["ip", "-n", rns, "addr", "add", f"{wan}/32", "dev", "wan"])
        _run(["ip", "-n", rns, "link", "set", "wan", "up"])
        _run(["ip", "-n", rns, "route", "add", gw, "dev", "wan"])
        _run(["ip", "-n", rns, "route", "add", "default", "via", gw, "dev", "wan", "src", wan])

    def _lan_port(self, rns: str, hns: str, port: str) -> None:
        """A veth from router ``rns``'s LAN bridge to host ``hns`` (eth0)."""
        _run(["ip", "-n", rns, "link", "add", port, "type", "veth", "peer", "name", "eth0",
              "netns", hns])
        no_offloads(rns, port)
        no_offloads(hns, "eth0")
        _run(["ip", "-n", rns, "link", "set", port, "master", "lan", "up"])

    def _attach_via_cgn(self, name: str, rns: str, public: str, n: int) -> str:
        """Put a carrier-grade NAT between home router ``rns`` and the
        internet (kind ``double``): the CGN has the public address ``public``
        and masquerades 100.64.N.0/24 (RFC 6598 space), where the home
        router's WAN gets 100.64.N.2.  Returns the home router's WAN
        address."""
        cgn = self._ns(f"c-{name}")
        self._attach(cgn, "wan", public)
        inside, home_wan = f"100.64.{n}.1", f"100.64.{n}.2"
        _veth(cgn, "lan", f"{inside}/24", rns, "wan", f"{home_wan}/24")
        _run(["ip", "-n", rns, "route", "add", "default", "via", inside])
        _sysctl(cgn, "net.ipv4.ip_forward", 1)
        _run(["ip", "netns", "exec", cgn, "nft", "-f", "-"],
             input=_nft_ruleset("restricted", public, f"100.64.{n}.0/24", home_wan, 0))
        return home_wan

    def _add_hairpin_second(self, name: str, first: Host) -> Host:
        """The second host behind ``first``'s hairpin router (module docs)."""
        if first.kind != "hairpin" or first.router_ns is None:
            raise ValueError(f"behind= needs a hairpin host, not {first.name!r} ({first.kind})")
        if any(h.router_ns == first.router_ns and h is not first for h in self.hosts.values()):
            raise ValueError(f"{first.name!r}'s hairpin router already has two hosts")
        rns = first.router_ns
        hns = self._ns(f"h-{name}")
        prefix = first.ip.rsplit(".", 1)[0]
        host_ip = f"{prefix}.3"
        self._lan_port(rns, hns, "lanp2")
        _run(["ip", "-n", hns, "addr", "add", f"{host_ip}/24", "dev", "eth0"])
        _run(["ip", "-n", hns, "link", "set", "eth0", "up"])
        _run(["ip", "-n", hns, "route", "add", "default", "via", f"{prefix}.1"])
        _run(["ip", "netns", "exec", hns, "sh", "-c",
              f'echo "{HAIRPIN_PORTS[1][0]} {HAIRPIN_PORTS[1][1]}" > '
              f'/proc/sys/net/ipv4/ip_local_port_range'])
        # Reload the router's rules with both hosts' port ranges.
        lan_net = f"{prefix}.0/24"
        _run(["ip", "netns", "exec", rns, "nft", "delete", "table", "ip", "natlab"])
        _run(["ip", "netns", "exec", rns, "nft", "-f", "-"],
             input=_nft_ruleset("hairpin", first.public_ip, lan_net, first.ip, first.loss,
                                [first.ip, host_ip]))
        host = Host(self, name, hns, host_ip, "hairpin", first.public_ip, rns, first.loss)
        self.hosts[name] = host
        return host

    def _public_ip(self) -> str:
        ip = str(INTERNET.network_address + self._next_public)
        self._next_public += 1
        return ip

    def add_host(self, name: str, kind: str = "none", *, loss: int = 0, ip: str | None = None,
                 behind: Host | None = None) -> Host:
        """A host behind a NAT of ``kind`` (see NAT_KINDS); ``loss`` percent
        random loss on its router, each direction.  ``behind``: for kind
        ``hairpin``, the first hairpin host, whose router the new host
        shares (module docs)."""
        if kind not in ALL_NAT_KINDS + PORTMAP_KINDS:
            raise ValueError(f"unknown NAT kind {kind!r}; expected one of "
                             f"{ALL_NAT_KINDS + PORTMAP_KINDS}")
        if name in self.hosts:
            raise ValueError(f"the lab already has a host {name!r}")
        if not 0 <= loss < 100:
            raise ValueError("loss is a percentage, 0..99")
        if behind is not None:
            return self._add_hairpin_second(name, behind)
        if kind == "none":
            if loss:
                raise ValueError("loss needs a router: use a NAT kind other than none")
            ns = self._ns(f"h-{name}")
            addr = ip or self._public_ip()
            self._attach(ns, "eth0", addr)
            host = Host(self, name, ns, addr, kind, addr)
            self.hosts[name] = host
            return host
        rns = self._ns(f"r-{name}")
        hns = self._ns(f"h-{name}")
        wan = ip or self._public_ip()
        n = self._next_lan
        self._next_lan += 1
        lan_net = f"10.{n}.0.0/24"
        router_lan, host_ip = f"10.{n}.0.1", f"10.{n}.0.2"
        public = wan
        if kind == "answering":
            self._attach_via_isp(name, rns, wan, n)
        elif kind == "double":
            wan = self._attach_via_cgn(name, rns, public, n)
        else:
            self._attach(rns, "wan", wan)
        if kind == "hairpin":
            # The LAN is a bridge, so a second host can join it.
            _run(["ip", "-n", rns, "link", "add", "lan", "type", "bridge"])
            no_offloads(rns, "lan")
            self._lan_port(rns, hns, "lanp1")
            _run(["ip", "netns", "exec", hns, "sh", "-c",
                  f'echo "{HAIRPIN_PORTS[0][0]} {HAIRPIN_PORTS[0][1]}" > '
                  f'/proc/sys/net/ipv4/ip_local_port_range'])
            # Hairpinned packets leave by the interface they came in on.
            _sysctl(rns, "net.ipv4.conf.all.send_redirects", 0)
            _sysctl(rns, "net.ipv4.conf.lan.send_redirects", 0)
            _run(["ip", "-n", rns, "addr", "add", f"{router_lan}/24", "dev", "lan"])
            _run(["ip", "-n", rns, "link", "set", "lan", "up"])
            _run(["ip", "-n", hns, "addr", "add", f"{host_ip}/24", "dev", "eth0"])
            _run(["ip", "-n", hns, "link", "set", "eth0", "up"])
        else:
            _veth(rns, "lan", f"{router_lan}/24", hns, "eth0", f"{host_ip}/24")
        _run(["ip", "-n", hns, "route", "add", "default", "via", router_lan])
        ex = ["ip", "netns", "exec", rns]
        _sysctl(rns, "net.ipv4.ip_forward", 1)
        _run(ex + ["nft", "-f", "-"], input=_nft_ruleset(kind, wan, lan_net, host_ip, loss,
                                                         [host_ip]))
        host = Host(self, name, hns, host_ip, kind, public, rns, loss)
        self.hosts[name] = host
        if self.udp_timeout is not None:
            # After the ruleset: its NAT rules load nf_conntrack, whose
            # sysctls exist only from then on.
            self.set_udp_timeout(host, self.udp_timeout)
        if kind == "upnp":
            from .upnp import start_miniupnpd
            self.miniupnpd[name] = start_miniupnpd(self, host, lan_net, router_lan)
        return host

    def set_udp_timeout(self, host: Host, seconds: int) -> None:
        """Lower the conntrack UDP timeouts of a host's router (to test NAT
        mapping refresh in less time).  Needs nf_conntrack loaded, which the
        router's NAT rules do."""
        for key in ("nf_conntrack_udp_timeout", "nf_conntrack_udp_timeout_stream"):
            _sysctl(host.router_ns or host.ns, f"net.netfilter.{key}", seconds)

    def loss_counters(self, host: Host) -> dict[str, int]:
        """The packets ``host``'s router offered to its forward hook
        (``forwarded``, both directions) and dropped by its loss rule
        (``lost``), from its nft counters: the measured loss is
        lost / forwarded."""
        if host.router_ns is None:
            raise LabError(f"{host.name} has no router, so no loss counters")
        out = _run(["ip", "netns", "exec", host.router_ns, "nft", "-j", "list", "counters",
                    "table", "ip", "natlab"]).stdout
        counts = {"forwarded": 0, "lost": 0}
        for item in json.loads(out).get("nftables", []):
            counter = item.get("counter")
            if counter and counter.get("name") in counts:
                counts[counter["name"]] = int(counter.get("packets", 0))
        return counts

    def tempdir(self) -> str:
        d = tempfile.mkdtemp(prefix=f"{self.prefix}-")
        os.chmod(d, 0o755)
        self._tmpdirs.append(d)
        return d

    def start_opentracker(self, host: Host, info_hashes: Sequence[bytes], port: int = 6969) -> tuple[str, int]:
        """opentracker (whitelist build) on ``host``, with ``info_hashes``
        whitelisted; returns its (ip, port) once it answers."""
        exe = shutil.which("opentracker")
        if exe is None:
            raise LabError("opentracker is not installed (Debian package opentracker)")
        d = self.tempdir()
        path = os.path.join(d, "whitelist.txt")
        with open(path, "w") as f:
            f.write("".join(h.hex() + "\n" for h in info_hashes))
        os.chmod(path, 0o644)
        host.popen([exe, "-i", host.ip, "-p", str(port), "-P", str(port), "-d", d,
                    "-u", "nobody", "-w", "/whitelist.txt"],
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        probe = ("import socket,struct,sys,time\n"
                 "s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM);s.settimeout(0.2)\n"
                 "end=time.time()+10\n"
                 "while time.time()<end:\n"
                 "  try:\n"
                 f"    s.sendto(struct.pack('>QII',0x41727101980,0,1),('{host.ip}',{port}));s.recvfrom(64);sys.exit(0)\n"
                 "  except OSError: pass\n"
                 "sys.exit(1)\n")
        if host.run([sys.executable, "-c", probe]).returncode != 0:
            raise LabError(f"opentracker on {host.ip}:{port} did not answer")
        time.sleep(0.3)  # it loads the whitelist in a thread after starting
        return host.ip, port


    def start_dht_node(self, host: Host, port: int = 6881, *,
                       env: dict[str, str] | None = None) -> tuple[str, int]:
        """A DHT node (``python -m dht serve``) on ``host``, the lab's
        bootstrap node; returns its (ip, port) once it serves.  ``env``
        is the environment to run it in (PYTHONPATH to find ``dht``)."""
        proc = host.popen([sys.executable, "-m", "dht", "serve", "--bind", f"{host.ip}:{port}"],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, env=env, text=True)
        line = proc.stdout.readline() if proc.stdout is not None else ""
        if not line.startswith("dht: serving on"):
            raise LabError(f"the DHT node on {host.ip}:{port} did not start ({line.strip()!r})")
        return host.ip, port


def read_line(proc: subprocess.Popen, what: str, timeout: float) -> str:
    """The next line of a lab process's (text) stdout, stripped; LabError
    naming ``what`` if none comes within ``timeout`` seconds."""
    import select
    end = time.monotonic() + timeout
    assert proc.stdout is not None
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], max(0.0, end - time.monotonic()))
        if r:
            line = proc.stdout.readline()
            if not line:
                break
            return line.strip()
    raise LabError(f"{what}: no output within {timeout} s (exit code {proc.poll()})")


def _kill_ns_pids(ns: str) -> None:
    """Kill what still runs in one of the lab's namespaces (only ever
    processes this lab started there)."""
    proc = _run(["ip", "netns", "pids", ns], check=False)
    for word in proc.stdout.split():
        try:
            os.kill(int(word), signal.SIGKILL)
        except (ValueError, ProcessLookupError, PermissionError):
            pass


def cleanup_stale() -> list[str]:
    """Delete the namespaces of lab runs whose process is gone; returns
    their names."""
    removed = []
    proc = _run(["ip", "netns", "list"], check=False)
    for line in proc.stdout.splitlines():
        name = line.split()[0] if line.split() else ""
        if not name.startswith(PREFIX):
            continue
        pid_text = name[len(PREFIX):].split("x", 1)[0]
        if pid_text.isdigit():
            try:
                os.kill(int(pid_text), 0)
                continue  # its run is still going
            except ProcessLookupError:
                pass
            except PermissionError:
                continue
        _kill_ns_pids(name)
        _run(["ip", "netns", "del", name], check=False)
        removed.append(name)
    return removed
