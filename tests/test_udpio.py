"""The binding's real-socket hot path, over real UDP sockets on loopback.

Context.setup_socket / recv_batch / send_batch / sendto / take_other /
io_stats, driven by a small select() loop: one Context per non-blocking
socket, as the trio Endpoint uses them.  Every loop is bounded in time.

Two cases need a send path that can actually fill up, which loopback never
does (its driver releases a datagram's socket memory as soon as it is
sent): they run in a child process in a fresh network namespace whose
loopback has a rate-limiting qdisc (root, unshare and tc needed; skipped
otherwise).
"""

import hashlib
import json
import os
import select
import shutil
import socket
import struct
import subprocess
import sys
import time

import pytest

import utp
from utp import Context

LO4 = "127.0.0.1"
LO6 = "::1"


def _has_ipv6_loopback():
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind((LO6, 0))
        return True
    except OSError:
        return False


HAS_IPV6 = _has_ipv6_loopback()
needs_ipv6 = pytest.mark.skipif(not HAS_IPV6, reason="no ipv6 loopback (::1) on this machine")


# --------------------------------------------------------------------------
# A peer: one UDP socket, one Context, driven by hand.
# --------------------------------------------------------------------------


class Peer:
    def __init__(self, host=LO4, *, dualstack=False, listening=False, udp_mtu=None, **setup):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        if dualstack:
            self.sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        self.sock.bind((host, 0))
        self.sock.setblocking(False)
        self.ctx = Context(udp_mtu=udp_mtu)
        self.ctx.listening = listening
        self.info = self.ctx.setup_socket(self.sock.fileno(), **setup)
        self.events = []
        self.blocked = False
        self.max_remaining = 0

    @property
    def port(self):
        return self.sock.getsockname()[1]

    def addr(self, host=None):
        """Our address as a peer would name it (host: how to spell us)."""
        return (host or self.sock.getsockname()[0], self.port)

    def receive(self):
        self.ctx.recv_batch(self.sock)
        self.ctx.issue_deferred_acks()
        self.ctx.check_timeouts()
        new = self.ctx.take_events()
        self.events.extend(new)
        return new

    def flush(self):
        remaining = self.ctx.send_batch(self.sock.fileno())
        self.blocked = remaining > 0
        self.max_remaining = max(self.max_remaining, remaining)
        return remaining

    def close(self):
        self.ctx.close()
        self.sock.close()


def pump(peers, until, timeout, step=None):
    """Run the peers' loops until until() is true; fail after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not until():
        if time.monotonic() > deadline:
            raise AssertionError(f"not done after {timeout} s")
        readers = [p.sock for p in peers]
        writers = [p.sock for p in peers if p.blocked]
        select.select(readers, writers, [], 0.005)
        for p in peers:
            p.receive()
        if step is not None:
            step()
        for p in peers:
            p.flush()


def transfer(a, b, b_addr, nbytes, timeout=60.0):
    """a connects to b (named b_addr) and sends nbytes of random data, then
    FIN; returns (sent sha256, received sha256, a's socket, b's socket)."""
    payload = os.urandom(nbytes)
    view = memoryview(payload)
    b.ctx.listening = True
    client = a.ctx.connect(b_addr)
    state = {"server": None, "sent": 0, "shut": False, "eof": False}
    digest = hashlib.sha256()
    received = [0]

    def step():
        for kind, sock, arg in a.events:
            if kind == "error":
                raise AssertionError(f"sender error {arg}")
        for kind, sock, arg in b.events:
            if kind == "accept":
                state["server"] = sock
            elif kind == "eof":
                state["eof"] = True
            elif kind == "error":
                raise AssertionError(f"receiver error {arg}")
        a.events.clear()
        b.events.clear()
        if client.connected and not state["shut"]:
            while state["sent"] < nbytes:
                n = client.write(view[state["sent"]:state["sent"] + (1 << 20)])
                if n == 0:
                    break
                state["sent"] += n
            if state["sent"] == nbytes:
                client.shutdown_write()
                state["shut"] = True
        server = state["server"]
        if server is not None and server.readable:
            data = server.read()
            digest.update(data)
            received[0] += len(data)

    pump([a, b], lambda: state["eof"] and received[0] == nbytes
         and state["server"].readable == 0, timeout, step)
    return hashlib.sha256(payload).hexdigest(), digest.hexdigest(), client, state["server"]


# --------------------------------------------------------------------------
# setup_socket
# --------------------------------------------------------------------------


def test_setup_socket_reports_what_the_kernel_granted():
    p = Peer()
    try:
        info = p.info
        assert set(info) >= {"rcvbuf", "sndbuf", "rmem_max", "wmem_max", "gso"}
        assert info["rcvbuf"] == p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert info["sndbuf"] == p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
        assert info["recverr"] is True
        assert isinstance(info["gso"], bool)
        if info["rmem_max"] > 0:
            # The default asks for rmem_max (at most 8 MiB); Linux doubles it.
            assert info["rcvbuf"] >= 2 * min(info["rmem_max"], 8 << 20)
        # Explicit sizes are asked for as given.
        info = p.ctx.setup_socket(p.sock, rcvbuf=65536, sndbuf=65536)
        assert info["rcvbuf"] == 2 * 65536 == p.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        assert info["sndbuf"] == 2 * 65536
    finally:
        p.close()


def test_setup_socket_rejects_what_is_not_a_udp_socket(tmp_path):
    ctx = Context()
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as tcp:
            with pytest.raises(OSError):
                ctx.setup_socket(tcp)
        with open(tmp_path / "f", "wb") as f:
            with pytest.raises(OSError):
                ctx.setup_socket(f.fileno())
            with pytest.raises(OSError):
                ctx.recv_batch(f.fileno())
    finally:
        ctx.close()


# --------------------------------------------------------------------------
# transfers
# --------------------------------------------------------------------------


@pytest.mark.parametrize("offload", [True, False], ids=["gso+gro", "plain"])
def test_handshake_and_32_mib_transfer_ipv4(offload):
    a = Peer(gso=offload, gro=offload)
    b = Peer(gso=offload, gro=offload)
    try:
        sent, got, client, server = transfer(a, b, b.addr(), 32 << 20)
        assert sent == got
        assert server.peername == a.addr()
        sa, sb = a.ctx.io_stats(), b.ctx.io_stats()
        assert sb["recv_utp"] == sb["recv_datagrams"] >= (32 << 20) // 1402
        assert sa["send_dropped"] == sb["send_dropped"] == 0
        assert sb["truncated"] == 0
        assert sa["send_errors"] == {} and sb["recv_errors"] == {}
        if offload and a.info["gso"]:
            assert sa["gso_batches"] > 0
            assert sa["send_calls"] < sa["sent_datagrams"]
        if not offload:
            assert sa["gso_batches"] == 0 and sb["recv_gro_batches"] == 0
        # Every datagram handed to the kernel was counted by the engine.
        assert sa["sent_datagrams"] == a.ctx.stats()["packets_out"]
    finally:
        a.close()
        b.close()


@needs_ipv6
def test_handshake_and_32_mib_transfer_ipv6():
    a, b = Peer(LO6), Peer(LO6)
    try:
        sent, got, client, server = transfer(a, b, (LO6, b.port), 32 << 20)
        assert sent == got
        assert server.peername[:2] == (LO6, a.port)
    finally:
        a.close()
        b.close()


def test_recv_batch_budget_and_empty_socket():
    a, b = Peer(), Peer()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        assert b.ctx.recv_batch(b.sock) == 0  # nothing waiting: 0, no error
        for i in range(10):
            plain.sendto(b"x%d" % i, b.addr())
        select.select([b.sock], [], [], 5)
        time.sleep(0.05)
        assert b.ctx.recv_batch(b.sock, budget=3) == 3
        assert b.ctx.recv_batch(b.sock, 0) == 0
        assert b.ctx.recv_batch(b.sock) == 7
        assert [d for _, d, _ in b.ctx.take_other()] == [b"x%d" % i for i in range(10)]
        assert b.ctx.take_other() == []
    finally:
        plain.close()
        a.close()
        b.close()


# --------------------------------------------------------------------------
# non-uTP datagrams share the socket
# --------------------------------------------------------------------------

DHT_PING = b"d1:ad2:id20:" + b"abcdefghij0123456789" + b"e1:q4:ping1:t2:aa1:y1:qe"
DHT_PONG = b"d1:rd2:id20:" + b"mnopqrstuv0123456789" + b"e1:t2:aa1:y1:re"
# BEP 15: connect request (protocol id, action 0, transaction id) and the
# tracker's response (action 0, transaction id, connection id).
TRACKER_CONNECT = struct.pack(">QII", 0x41727101980, 0, 0x1234ABCD)
TRACKER_CONNECTED = struct.pack(">IIQ", 0, 0x1234ABCD, 0x0123456789ABCDEF)
GARBAGE = b"\xffthis is neither uTP, KRPC nor BEP 15"


def _other_exchange(p, plain, peer_addr, expect_addr):
    for msg in (DHT_PING, TRACKER_CONNECT, TRACKER_CONNECTED, GARBAGE):
        plain.sendto(msg, peer_addr)
    got = []
    pump([p], lambda: len(got) >= 4, 5.0, lambda: got.extend(p.ctx.take_other()))
    assert got == [
        (utp.UTPKIT_CLASS_DHT, DHT_PING, expect_addr),
        (utp.UTPKIT_CLASS_TRACKER, TRACKER_CONNECT, expect_addr),
        (utp.UTPKIT_CLASS_TRACKER, TRACKER_CONNECTED, expect_addr),
        (utp.UTPKIT_CLASS_OTHER, GARBAGE, expect_addr),
    ]
    st = p.ctx.io_stats()
    assert (st["recv_dht"], st["recv_tracker"], st["recv_other"], st["recv_utp"]) == (1, 2, 1, 0)
    assert p.ctx.stats()["packets_in"] == 0  # none of them reached the engine
    # The DHT owner answers through the shared socket.
    assert p.ctx.sendto(p.sock, DHT_PONG, expect_addr) is True
    plain.settimeout(5)
    data, src = plain.recvfrom(2048)
    assert data == DHT_PONG
    assert src[1] == p.port
    assert p.ctx.io_stats()["sent_datagrams"] == 1


def test_non_utp_datagrams_reach_take_other_ipv4():
    p = Peer()
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind((LO4, 0))
    try:
        _other_exchange(p, plain, p.addr(), plain.getsockname())
    finally:
        plain.close()
        p.close()


@needs_ipv6
def test_non_utp_datagrams_reach_take_other_ipv6():
    p = Peer(LO6)
    plain = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    plain.bind((LO6, 0))
    try:
        _other_exchange(p, plain, p.addr(), plain.getsockname())
    finally:
        plain.close()
        p.close()


def test_sendto_validates():
    p = Peer()
    try:
        with pytest.raises(ValueError):
            p.ctx.sendto(p.sock, b"x", ("not an address", 1))
        with pytest.raises(ValueError):
            p.ctx.sendto(p.sock, bytes(70000), (LO4, 9))
        assert p.ctx.pending_datagrams == 0
    finally:
        p.close()


# --------------------------------------------------------------------------
# ICMP
# --------------------------------------------------------------------------


def _closed_port(host):
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _refused_quickly(p, dest):
    syn_timeout = p.ctx.get_option(utp.UTPKIT_SYN_TIMEOUT) / 1000
    t0 = time.monotonic()
    sock = p.ctx.connect(dest)
    pump([p], lambda: any(k == "error" for k, _, _ in p.events), 5.0)
    elapsed = time.monotonic() - t0
    errors = [(s, arg) for k, s, arg in p.events if k == "error"]
    assert errors == [(sock, utp.UTP_ECONNREFUSED)]
    # Refused by the ICMP report, not by the SYN's retransmission timer.
    assert elapsed < syn_timeout / 2
    st = p.ctx.io_stats()
    assert st["icmp_unreach"] >= 1
    assert st["icmp_matched"] >= 1
    assert p.ctx.stats()["icmp_handled"] >= 1
    sock.close()


def test_icmp_port_unreachable_refuses_connect_ipv4():
    p = Peer()
    try:
        _refused_quickly(p, (LO4, _closed_port(LO4)))
    finally:
        p.close()


@needs_ipv6
def test_icmp_port_unreachable_refuses_connect_ipv6():
    p = Peer(LO6)
    try:
        _refused_quickly(p, (LO6, _closed_port(LO6)))
    finally:
        p.close()


@needs_ipv6
def test_icmp_port_unreachable_on_dual_stack_socket():
    p = Peer("::", dualstack=True)
    try:
        # An IPv4 destination from an AF_INET6 socket: the ICMPv4 report
        # comes back with an IPv4-mapped address, matched as IPv4.
        _refused_quickly(p, (LO4, _closed_port(LO4)))
    finally:
        p.close()


def test_send_errors_are_counted_not_raised():
    p = Peer()
    try:
        # An IPv6 destination from an AF_INET socket: the kernel refuses
        # each datagram; it is dropped and counted, never raised.
        assert p.ctx.sendto(p.sock, b"d1:xe", ("::1", 9, 0, 0)) is True
        st = p.ctx.io_stats()
        assert st["send_dropped"] == 1
        assert sum(st["send_errors"].values()) >= 1
        assert st["queued"] == 0
    finally:
        p.close()


# --------------------------------------------------------------------------
# dual stack
# --------------------------------------------------------------------------


@needs_ipv6
def test_dual_stack_socket_talks_to_ipv4_peer_with_plain_ipv4_addresses():
    ds = Peer("::", dualstack=True)
    v4 = Peer(LO4)
    plain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    plain.bind((LO4, 0))
    try:
        # IPv4 peer -> dual-stack listener: the acceptor sees 127.0.0.1,
        # not ::ffff:127.0.0.1.
        sent, got, client, server = transfer(v4, ds, (LO4, ds.port), 1 << 20)
        assert sent == got
        assert server.peername == (LO4, v4.port)
        # Dual-stack -> IPv4 listener, addressed with a plain IPv4 tuple.
        sent, got, client, server = transfer(ds, v4, (LO4, v4.port), 1 << 20)
        assert sent == got
        assert client.peername == (LO4, v4.port)
        assert server.peername == (LO4, ds.port)
        # Non-uTP datagrams too.
        plain.sendto(DHT_PING, (LO4, ds.port))
        got_other = []
        pump([ds], lambda: got_other, 5.0, lambda: got_other.extend(ds.ctx.take_other()))
        assert got_other == [(utp.UTPKIT_CLASS_DHT, DHT_PING, plain.getsockname())]
        # The same socket still speaks IPv6.
        v6 = Peer(LO6)
        try:
            sent, got, client, server = transfer(v6, ds, (LO6, ds.port), 1 << 20)
            assert sent == got
            assert server.peername[:2] == (LO6, v6.port)
        finally:
            v6.close()
    finally:
        plain.close()
        ds.close()
        v4.close()


# --------------------------------------------------------------------------
# In a private network namespace: a full send path, DONTFRAG and EMSGSIZE.
# --------------------------------------------------------------------------


def _netns_unavailable():
    if sys.platform != "linux":
        return "network namespaces are Linux only"
    if os.geteuid() != 0:
        return "needs root for a private network namespace"
    for tool in ("unshare", "ip", "tc"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    r = subprocess.run(["unshare", "-n", "true"], capture_output=True)
    if r.returncode != 0:
        return f"unshare -n fails here: {r.stderr.decode(errors='replace').strip()}"
    return None


_NETNS_WHY = _netns_unavailable()
needs_netns = pytest.mark.skipif(_NETNS_WHY is not None, reason=f"{_NETNS_WHY}")


def _in_netns(scenario, *, lo_setup):
    """Run _scenario_<scenario>() in a child process in a new network
    namespace whose loopback was set up with the `ip`/`tc` commands of
    lo_setup; return the JSON it prints."""
    utp_root = os.path.dirname(os.path.dirname(os.path.abspath(utp.__file__)))
    code = (
        "import importlib.util, json, subprocess, sys\n"
        f"sys.path.insert(0, {utp_root!r})\n"
        f"for cmd in {lo_setup!r}:\n"
        "    subprocess.run(cmd, check=True)\n"
        f"spec = importlib.util.spec_from_file_location('udpio_child', {os.path.abspath(__file__)!r})\n"
        "mod = importlib.util.module_from_spec(spec)\n"
        "spec.loader.exec_module(mod)\n"
        f"print(json.dumps(mod._scenario_{scenario}()))\n"
    )
    r = subprocess.run(["unshare", "-n", sys.executable, "-I", "-c", code],
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr.decode(errors="replace")
    return json.loads(r.stdout.decode().strip().splitlines()[-1])


def _scenario_full_send_buffer():
    # The smallest send buffer the kernel allows, behind a qdisc that holds
    # datagrams (and their socket memory) until the rate allows them out.
    a = Peer(sndbuf=0)
    b = Peer()
    try:
        sent, got, client, server = transfer(a, b, b.addr(), 8 << 20, timeout=90)
        return {
            "equal": sent == got,
            "sndbuf": a.info["sndbuf"],
            "max_remaining": a.max_remaining,
            "io_a": a.ctx.io_stats(),
            "io_b": b.ctx.io_stats(),
            "rexmit": client.stats()["rexmit"],
            "timeouts": client.info()["timeouts"],
        }
    finally:
        a.close()
        b.close()


@needs_netns
def test_full_send_buffer_waits_and_loses_nothing():
    r = _in_netns("full_send_buffer", lo_setup=[
        ["ip", "link", "set", "lo", "up"],
        ["tc", "qdisc", "add", "dev", "lo", "root", "tbf",
         "rate", "400mbit", "burst", "128kb", "latency", "20ms"],
    ])
    assert r["equal"]
    assert r["sndbuf"] < 16384
    # send_batch said "wait for writability" at some point ...
    assert r["max_remaining"] > 0
    assert r["io_a"]["send_eagain"] + r["io_a"]["send_enobufs"] > 0
    # ... and nothing was thrown away for it.
    assert r["io_a"]["send_dropped"] == 0
    assert r["io_b"]["kernel_drops"] == 0
    assert r["timeouts"] == 0
    assert r["rexmit"] == 0


def _scenario_dontfrag(host):
    # Packets up to 9000 bytes allowed, so the engine probes upward with
    # DONTFRAG; loopback's MTU here is 1500, so large probes fail at once
    # with EMSGSIZE, which must reach the engine.
    a = Peer(host, udp_mtu=9000)
    b = Peer(host, udp_mtu=9000)
    try:
        sent, got, client, server = transfer(a, b, b.addr(), 8 << 20, timeout=60)
        return {
            "equal": sent == got,
            "io_a": a.ctx.io_stats(),
            "mtu": client.stats()["mtu_guess"],
            "icmp_handled": a.ctx.stats()["icmp_handled"],
        }
    finally:
        a.close()
        b.close()


def _scenario_dontfrag_ipv4():
    return _scenario_dontfrag(LO4)


def _scenario_dontfrag_ipv6():
    return _scenario_dontfrag(LO6)


@needs_netns
@pytest.mark.parametrize("family", ["ipv4", "ipv6"])
def test_dontfrag_probe_refused_with_emsgsize_lowers_packet_size(family):
    r = _in_netns(f"dontfrag_{family}", lo_setup=[
        ["ip", "link", "set", "lo", "mtu", "1500"],
        ["ip", "link", "set", "lo", "up"],
    ])
    assert r["equal"]
    headers = 28 if family == "ipv4" else 48
    io = r["io_a"]
    assert io["dontfrag_sent"] > 0      # probes that fit went out with DF
    assert io["emsgsize"] > 0           # the ones that did not were refused ...
    assert r["icmp_handled"] > 0        # ... and the engine heard of it
    assert io["send_dropped"] == io["emsgsize"]
    # The engine settled just under the path MTU.
    assert 1232 <= r["mtu"] <= 1500 - headers


def _scenario_gso_refused():
    # Loopback's MTU below the packet size: datagrams are fragmented, but a
    # GSO send with segments larger than the MTU is refused (EINVAL).  The
    # refused runs must go out one by one, and GSO must end up off.
    a, b = Peer(), Peer()
    try:
        sent, got, client, server = transfer(a, b, b.addr(), 4 << 20, timeout=60)
        return {"equal": sent == got, "gso": a.info["gso"], "io_a": a.ctx.io_stats(),
                "rexmit": client.stats()["rexmit"]}
    finally:
        a.close()
        b.close()


@needs_netns
def test_gso_refused_by_the_kernel_falls_back_to_single_datagrams():
    r = _in_netns("gso_refused", lo_setup=[
        ["ip", "link", "set", "lo", "mtu", "1300"],
        ["ip", "link", "set", "lo", "up"],
    ])
    assert r["equal"]
    io = r["io_a"]
    if not r["gso"]:
        from testsupport import unavailable   # here: this module is also run in a child
        unavailable("the kernel has no UDP GSO (UDP_SEGMENT)", "CI's kernel has UDP GSO")
    assert io["gso_failed"] >= 1
    assert io["send_dropped"] == 0
    assert r["rexmit"] == 0
