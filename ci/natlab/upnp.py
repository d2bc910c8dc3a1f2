"""natlab's ``upnp`` routers: a port-restricted NAT (``masquerade``, input
firewall, like ``restricted``) that runs **miniupnpd** (Debian's
``miniupnpd-nftables``) with NAT-PMP, PCP and UPnP IGD on its LAN side,
for testing :func:`utp.port_mapping` against a real implementation.

How it is confined: miniupnpd runs inside the router's namespace with a
config file, pid file and lease file of its own in the lab's temp
directory, listens only on the router's ``lan`` interface (SSDP multicast,
NAT-PMP/PCP on 5351, its HTTP port), and writes its rules into an nftables
table of its own, ``inet miniupnpd`` (chains ``forward_miniupnpd``,
``prerouting_miniupnpd``, ``postrouting_miniupnpd``, hooked in just before
the lab's own ``ip natlab`` chains), which this module creates.  Nothing it
sends can leave the lab: the namespaces have no route outside.

Why a STUN responder: miniupnpd refuses to forward ports when its WAN
address is in a reserved range ("Port forwarding is impossible"), and the
lab's internet is 198.18.0.0/15, reserved for benchmarks.  Its documented
way out is ``ext_perform_stun``: it asks a STUN server what its public
address is and whether a NAT filters in front of it.  The lab gives it one,
on a public host of the lab's internet: a minimal RFC 5389 Binding
responder that answers every request from its own address with the
request's source as XOR-MAPPED-ADDRESS (it has no second address, so it
answers the CHANGE-REQUEST probes from the same one: the router's WAN is
directly on the lab's internet, nothing filters in front of it, which is
the truth such a test would find).  miniupnpd then learns that 198.18.x.y
is its public address and turns forwarding on.

What it is not: a model of any particular home router's UPnP stack.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from . import Host, Lab

__all__ = ["MiniUpnpd", "start_miniupnpd", "restart_miniupnpd", "miniupnpd_mappings", "STUN_PORT",
           "can_run"]

STUN_PORT = 3478
TABLE = "miniupnpd"

_STUN_RESPONDER = r"""
import socket, struct, sys
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((sys.argv[1], int(sys.argv[2])))
print("stun: ready", flush=True)
while True:
    data, (ip, port) = s.recvfrom(2048)
    # A Binding request with the RFC 5389 magic cookie, nothing else.
    if len(data) < 20 or data[:2] != b"\x00\x01" or data[4:8] != b"\x21\x12\xa4\x42":
        continue
    addr = struct.unpack(">I", socket.inet_aton(ip))[0] ^ 0x2112A442
    attr = struct.pack(">HHBBHI", 0x0020, 8, 0, 1, port ^ 0x2112, addr)
    s.sendto(struct.pack(">HH", 0x0101, len(attr)) + data[4:20] + attr, (ip, port))
"""

_NFT = f"""
table inet {TABLE} {{
  chain forward {{
    type filter hook forward priority filter - 1; policy accept;
    jump forward_miniupnpd
  }}
  chain forward_miniupnpd {{
  }}
  chain prerouting {{
    type nat hook prerouting priority dstnat - 1; policy accept;
    jump prerouting_miniupnpd
  }}
  chain prerouting_miniupnpd {{
  }}
  chain postrouting {{
    type nat hook postrouting priority srcnat - 1; policy accept;
    jump postrouting_miniupnpd
  }}
  chain postrouting_miniupnpd {{
  }}
}}
"""


@dataclass
class MiniUpnpd:
    """One router's miniupnpd: its process, files, and the LAN address its
    NAT-PMP/PCP server listens on."""

    proc: subprocess.Popen
    config: str
    log: str
    lan_ip: str
    lan_net: str = ""

    def log_text(self) -> str:
        with open(self.log, errors="replace") as f:
            return f.read()


def can_run() -> str | None:
    """None if miniupnpd can run here, else why not."""
    if not os.path.exists("/usr/sbin/miniupnpd"):
        return "miniupnpd is not installed (Debian package miniupnpd-nftables)"
    return None


def _config(lan_net: str, stun_ip: str, workdir: str) -> str:
    # Short PCP lifetimes allowed (min_lifetime), so tests can watch a
    # renewal in seconds; secure_mode: a client maps only to itself.
    return f"""ext_ifname=wan
listening_ip=lan
http_port=0
enable_natpmp=yes
enable_upnp=yes
secure_mode=yes
system_uptime=no
notify_interval=60
clean_ruleset_interval=600
ext_perform_stun=yes
ext_stun_host={stun_ip}
ext_stun_port={STUN_PORT}
min_lifetime=2
max_lifetime=86400
uuid={uuid.uuid4()}
upnp_table_name={TABLE}
upnp_nat_table_name={TABLE}
upnp_forward_chain=forward_miniupnpd
upnp_nat_chain=prerouting_miniupnpd
upnp_nat_postrouting_chain=postrouting_miniupnpd
lease_file={workdir}/leases
allow 1024-65535 {lan_net} 1024-65535
deny 0-65535 0.0.0.0/0 0-65535
"""


def _stun_host(lab: Lab) -> Host:
    """The lab's STUN responder (one per lab, on a public host)."""
    host = lab.hosts.get("upnp-stun")
    if host is not None:
        return host
    host = lab.add_host("upnp-stun", "none")
    proc = host.popen([sys.executable, "-c", _STUN_RESPONDER, host.ip, str(STUN_PORT)],
                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    line = proc.stdout.readline() if proc.stdout is not None else ""
    if not line.startswith("stun: ready"):
        from . import LabError
        raise LabError(f"the lab's STUN responder on {host.ip} did not start ({line.strip()!r})")
    return host


def start_miniupnpd(lab: Lab, host: Host, lan_net: str, lan_ip: str) -> MiniUpnpd:
    """Run miniupnpd in ``host``'s router; returns once its NAT-PMP/PCP
    server listens and STUN turned forwarding on."""
    from . import LabError, _run

    why = can_run()
    if why:
        raise LabError(why)
    assert host.router_ns is not None
    stun = _stun_host(lab)
    workdir = lab.tempdir()
    config = os.path.join(workdir, "miniupnpd.conf")
    with open(config, "w") as f:
        f.write(_config(lan_net, stun.ip, workdir))
    log = os.path.join(workdir, "miniupnpd.log")
    _run(["ip", "netns", "exec", host.router_ns, "nft", "-f", "-"], input=_NFT)
    with open(log, "w") as out:
        proc = subprocess.Popen(["ip", "netns", "exec", host.router_ns, "miniupnpd", "-d",
                                 "-f", config, "-P", os.path.join(workdir, "miniupnpd.pid")],
                                stdout=out, stderr=subprocess.STDOUT, cwd="/")
    lab._procs.append(proc)
    daemon = MiniUpnpd(proc, config, log, lan_ip, lan_net)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = daemon.log_text()
        if "Listening for NAT-PMP/PCP traffic" in text:
            if "Port forwarding is now enabled" not in text:
                raise LabError(f"miniupnpd in {host.router_ns} did not enable forwarding:\n{text[-2000:]}")
            return daemon
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    raise LabError(f"miniupnpd in {host.router_ns} did not start:\n{daemon.log_text()[-2000:]}")


def restart_miniupnpd(lab: Lab, name: str) -> MiniUpnpd:
    """Restart host ``name``'s miniupnpd the way a rebooting router does:
    kill it, forget every forward (its nft chains flushed, a fresh lease
    file), start it again.  At its start it announces itself to the LAN
    (224.0.0.1:5350), which is what clients must notice."""
    from . import _run

    old = lab.miniupnpd[name]
    host = lab.hosts[name]
    assert host.router_ns is not None
    old.proc.kill()      # as abrupt as a power cut: no goodbye to the LAN
    old.proc.wait()
    for chain in ("forward_miniupnpd", "prerouting_miniupnpd", "postrouting_miniupnpd"):
        _run(["ip", "netns", "exec", host.router_ns, "nft", "flush", "chain", "inet", TABLE, chain])
    lab.miniupnpd[name] = start_miniupnpd(lab, host, old.lan_net, old.lan_ip)
    return lab.miniupnpd[name]


def miniupnpd_mappings(host: Host) -> list[dict[str, Any]]:
    """The port forwards miniupnpd has in ``host``'s router's nft ruleset:
    one dict per DNAT rule, with ``external_port``, ``internal_ip``,
    ``internal_port`` and ``protocol`` ("udp"/"tcp")."""
    proc = host.router(["nft", "-j", "list", "chain", "inet", TABLE, "prerouting_miniupnpd"])
    if proc.returncode != 0:
        from . import LabError
        raise LabError(f"nft list chain inet {TABLE} prerouting_miniupnpd failed: {proc.stderr.strip()}")
    found = []
    for item in json.loads(proc.stdout).get("nftables", []):
        rule = item.get("rule")
        if not rule:
            continue
        entry: dict[str, Any] = {}
        for expr in rule.get("expr", []):
            match = expr.get("match")
            if match:
                left, right = match.get("left", {}), match.get("right")
                if "payload" in left and left["payload"].get("field") == "dport":
                    entry["external_port"] = right
                if "payload" in left and left["payload"].get("base") == "nh" \
                        and left["payload"].get("offset") == 72:
                    entry["protocol"] = {6: "tcp", 17: "udp"}.get(right, str(right))
            dnat = expr.get("dnat")
            if dnat:
                entry["internal_ip"] = dnat.get("addr")
                entry["internal_port"] = dnat.get("port")
        found.append(entry)
    return found
