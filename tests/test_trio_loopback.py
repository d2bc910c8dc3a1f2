"""The trio layer on real UDP sockets over loopback (127.0.0.1 and ::1)."""

from __future__ import annotations

import hashlib
import os
import random
import socket

import pytest
import trio
import trio.testing

import utp
from testsupport import clogged, have_ipv6_loopback


needs_ipv6 = pytest.mark.skipif(not have_ipv6_loopback(), reason="no ipv6 loopback (::1) here")


async def _pair(nursery, host="127.0.0.1"):
    """Two Endpoints and a connected stream pair, run in `nursery`."""
    ready = trio.Event()
    box = {}

    async def run():
        async with utp.open_endpoint(host, 0) as a, utp.open_endpoint(host, 0) as b:
            listener = b.listen()
            async with trio.open_nursery() as n:
                async def acc():
                    box["b"] = await listener.accept()
                n.start_soon(acc)
                box["a"] = await a.connect(b.local_address[:2])
            box["eps"] = (a, b)
            ready.set()
            await trio.sleep_forever()

    nursery.start_soon(run)
    await ready.wait()
    return box["a"], box["b"]


async def test_check_half_closeable_stream_loopback(nursery):
    """trio's conformance check, with a clogged maker: this is what checks
    wait_send_all_might_not_block's wake-ups (close, room in the buffer)."""
    async def make():
        return await _pair(nursery)
    await trio.testing.check_half_closeable_stream(make, clogged(make))
    nursery.cancel_scope.cancel()


@needs_ipv6
async def test_ipv6_transfer_and_dual_stack(nursery):
    s, r = await _pair(nursery, "::1")
    data = os.urandom(4 << 20)
    async with trio.open_nursery() as n:
        n.start_soon(s.send_all, data)
        got = bytearray()
        while len(got) < len(data):
            got += await r.receive_some()
    assert got == data
    # A dual-stack Endpoint reaches an IPv4 peer; the peer's address is the
    # plain IPv4 form, not ::ffff:127.0.0.1.
    async with utp.open_endpoint(None, 0) as dual, utp.open_endpoint("127.0.0.1", 0) as v4:
        listener = v4.listen()
        stream = await dual.connect(("127.0.0.1", v4.local_address[1]))
        peer = await listener.accept()
        await stream.send_all(b"via dual stack")
        assert await peer.receive_some() == b"via dual stack"
        assert peer.peer_address[0] == "127.0.0.1"
        assert stream.peer_address[0] == "127.0.0.1"


async def test_open_utp_stream_and_serve_utp(nursery):
    async def echo(stream):
        async for chunk in stream:
            await stream.send_all(chunk)

    listeners = await nursery.start(utp.serve_utp, echo, 0)
    port = listeners[0].endpoint.local_address[1]
    stream = await utp.open_utp_stream("localhost", port)
    data = random.Random(1).randbytes(1 << 20)
    async with trio.open_nursery() as n:
        n.start_soon(stream.send_all, data)
        got = bytearray()
        while len(got) < len(data):
            got += await stream.receive_some()
    assert got == data
    await stream.aclose()
    nursery.cancel_scope.cancel()


async def test_open_utp_stream_errors():
    # Nothing listens: the ICMP port-unreachable (or the peer's RESET) makes
    # this quick, not a timeout.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with trio.fail_after(5):
        with pytest.raises(ConnectionRefusedError):
            await utp.open_utp_stream("127.0.0.1", closed_port, connect_timeout=4)
    with pytest.raises(OSError, match="bad port"):
        await utp.open_utp_stream("127.0.0.1", 0)
    with pytest.raises(OSError, match="cannot resolve"):
        await utp.open_utp_stream("no-such-host.invalid", 80, numeric_host=True)


async def test_endpoint_reports_socket_buffers_and_bind_errors():
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        stats = ep.statistics()
        bufs = stats["socket_buffers"]
        assert bufs["rcvbuf"] > 0 and bufs["sndbuf"] > 0
        port = ep.local_address[1]
        with pytest.raises(OSError, match="already in use"):
            async with utp.open_endpoint("127.0.0.1", port):
                pass
    with pytest.raises(ValueError, match="port"):
        async with utp.open_endpoint("127.0.0.1", 70000):
            pass


async def test_shared_socket_carries_utp_and_dht_at_once(nursery):
    async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.1", 0) as b:
        dht = b.datagram_queue("dht")
        listener = b.listen()
        stream = await a.connect(b.local_address)
        peer = await listener.accept()
        payload = os.urandom(8 << 20)
        ping = b"d1:ad2:id20:" + b"i" * 20 + b"e1:q4:ping1:t2:xx1:y1:qe"

        async def pings():
            for _ in range(200):
                await a.sendto(ping, b.local_address)
                await trio.sleep(0.001)

        h = hashlib.sha256()
        async with trio.open_nursery() as n:
            n.start_soon(stream.send_all, payload)
            n.start_soon(pings)
            got = 0
            while got < len(payload):
                chunk = await peer.receive_some()
                h.update(chunk)
                got += len(chunk)
        assert h.digest() == hashlib.sha256(payload).digest()
        with trio.fail_after(5):
            while dht.statistics()["received"] + dht.statistics()["dropped"] < 200:
                await trio.sleep(0.01)
        stats = b.statistics()
        assert stats["owners"]["dht"]["received"] >= 190
        assert stats["engine"]["packets_in"] > 5000
        data, src = await dht.receive()
        assert data == ping and src == a.local_address


async def test_two_thousand_connections_on_one_endpoint():
    """2,000 concurrent connections on one Endpoint, data moved on all."""
    n_conns = 2000
    async with utp.open_endpoint("127.0.0.1", 0, options={utp.UTPKIT_MAX_SOCKETS: 5000}) as server, \
            utp.open_endpoint("127.0.0.1", 0, options={utp.UTPKIT_MAX_SOCKETS: 5000}) as client:
        listener = server.listen(backlog=n_conns)
        received = 0

        async def serve_one(stream):
            nonlocal received
            data = await stream.receive_some()
            received += 1
            await stream.send_all(data[::-1])

        async def acceptor(n):
            for _ in range(n_conns):
                n.start_soon(serve_one, await listener.accept())

        ok = 0

        async def client_one(i):
            nonlocal ok
            stream = await client.connect(server.local_address, timeout=60)
            msg = b"connection %d " % i * 8
            await stream.send_all(msg)
            reply = await stream.receive_some()
            assert reply == msg[::-1]
            ok += 1

        with trio.fail_after(120):
            async with trio.open_nursery() as n:
                n.start_soon(acceptor, n)
                async with trio.open_nursery() as clients:
                    for i in range(n_conns):
                        clients.start_soon(client_one, i)
        assert ok == n_conns and received == n_conns
        assert server.statistics()["engine"]["sockets_peak"] >= n_conns


async def test_exceptions_from_the_body_come_out_unwrapped():
    """The Endpoint's internal nursery never wraps the caller's exception
    (trio >= 0.25 groups whatever a nursery raises)."""
    with pytest.raises(KeyError):
        async with utp.open_endpoint("127.0.0.1", 0):
            raise KeyError("mine")
    with pytest.raises(trio.TooSlowError):
        with trio.fail_after(0.05):
            async with utp.open_endpoint("127.0.0.1", 0):
                await trio.sleep(1)


@pytest.mark.parametrize("host", ["127.0.0.1", None])
async def test_sendto_with_ttl_sets_the_ttl_of_that_datagram_only(host):
    # Hole punching's NAT-opening probes (issue 10) leave with a small TTL;
    # the datagram after them has the socket's default again.  The
    # receiver reads each datagram's TTL (IP_RECVTTL); host None is the
    # dual-stack socket sending to an IPv4-mapped address.
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    # IP_RECVTTL is 12 on Linux; Python's socket module does not name it.
    rx.setsockopt(socket.IPPROTO_IP, getattr(socket, "IP_RECVTTL", 12), 1)
    rx.bind(("127.0.0.1", 0))
    rx.settimeout(5.0)
    try:
        async with utp.open_endpoint(host, 0) as ep:
            assert await ep.sendto_with_ttl(b"low", rx.getsockname(), 3)
            await ep.sendto(b"normal", rx.getsockname())
            with pytest.raises(ValueError, match="ttl"):
                await ep.sendto_with_ttl(b"x", rx.getsockname(), 0)
        ttls = {}
        for _ in range(2):
            data, anc, _flags, _addr = rx.recvmsg(100, socket.CMSG_SPACE(4))
            ttl = [int.from_bytes(d[:4], "little") for lvl, typ, d in anc
                   if lvl == socket.IPPROTO_IP and typ == socket.IP_TTL]
            ttls[data] = ttl[0]
        assert ttls[b"low"] == 3
        assert ttls[b"normal"] > 3
    finally:
        rx.close()


async def test_open_utp_stream_port_must_be_an_int():
    """A str port is a type error, not a "bad port" (issue 13)."""
    with pytest.raises(TypeError, match="port must be an int, not str '9000'"):
        await utp.open_utp_stream("127.0.0.1", "9000")


@needs_ipv6
@pytest.mark.parametrize("bound, target", [("::1", "127.0.0.1"), ("127.0.0.1", "::1")])
async def test_connect_across_address_families_fails_at_once(bound, target):
    """An Endpoint on ::1 cannot reach 127.0.0.1 (nor the reverse): connect
    says so at once instead of waiting out its timeout."""
    async with utp.open_endpoint(bound, 0) as ep:
        with trio.fail_after(2):
            with pytest.raises(OSError, match="the address families differ"):
                await ep.connect((target, 9), timeout=10)


async def test_endpoint_reports_icmp_port_unreachable_for_datagrams():
    """A DHT-style datagram to a closed port: the kernel's ICMP port
    unreachable reaches the Endpoint (wait_port_unreachable, port_unreachable),
    so the DHT and tracker clients can say "refused" at once."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        closed = ("127.0.0.1", probe.getsockname()[1])
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        start = trio.current_time()
        assert not ep.port_unreachable(closed)
        with trio.fail_after(5):
            async with trio.open_nursery() as n:
                n.start_soon(ep.wait_port_unreachable, closed)
                await trio.testing.wait_all_tasks_blocked()
                await ep.sendto(b"d1:ad2:id20:" + b"x" * 20 + b"e1:q4:ping1:t2:aa1:y1:qe", closed)
        assert ep.port_unreachable(closed, since=start)
        assert not ep.port_unreachable(("127.0.0.1", closed[1] ^ 1))


# ---- accept hooks: the firewall in the engine, claims, Endpoint.punch -----------------


async def test_firewall_refuses_before_the_syn_ack_on_real_sockets():
    async with utp.open_endpoint("127.0.0.1", 0) as server, \
            utp.open_endpoint("127.0.0.2", 0) as refused, \
            utp.open_endpoint("127.0.0.1", 0) as allowed:
        listener = server.listen()
        asked = []

        def firewall(addr):
            asked.append(addr[0])
            return addr[0] != "127.0.0.2"
        listener.firewall = firewall
        where = server.local_address[:2]
        with trio.fail_after(10):
            with pytest.raises(ConnectionRefusedError):
                await refused.connect(where)
            eng = server.statistics()["engine"]
            # No socket was ever made for it, so no ON_ACCEPT could fire.
            assert eng["sockets_created"] == 0 and eng["syn_refused"] >= 1
            assert listener.statistics()["queued"] == 0
            assert listener.statistics()["refused_firewall"] >= 1
            s = await allowed.connect(where)
            peer = await listener.accept()
        assert asked[0] == "127.0.0.2" and asked[-1] == "127.0.0.1"
        assert peer.peer_address[0] == "127.0.0.1"
        assert server.statistics()["engine"]["sockets_created"] == 1
        assert listener.statistics()["accepted"] == 1
        await s.send_all(b"hello")
        assert await peer.receive_some() == b"hello"
        await s.aclose()
        await peer.aclose()


async def test_punch_on_a_listening_endpoint_over_loopback():
    # 127.0.0.2 sorts higher, so `b` answers the punch while its application
    # listener stays open and takes a third peer's connection meanwhile.
    async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.2", 0) as b, \
            utp.open_endpoint("127.0.0.3", 0) as c:
        app = b.listen()
        pa, pb = a.local_address[:2], b.local_address[:2]
        out = {}

        async def side_b():
            out["b"] = await b.punch(pa, local_public=pb, timeout=10)

        async def third():
            out["c"] = await c.connect(pb)
            out["app"] = await app.accept()

        with trio.fail_after(20):
            async with trio.open_nursery() as n:
                n.start_soon(side_b)
                n.start_soon(third)
                out["a"] = await a.punch(pb, local_public=pa, timeout=10)
        sa, sb = out["a"], out["b"]
        assert sb.peer_address[:2] == pa and out["app"].peer_address[0] == "127.0.0.3"
        await sa.send_all(b"punched")
        assert await sb.receive_some() == b"punched"
        await out["c"].send_all(b"app")
        assert await out["app"].receive_some() == b"app"
        st = b.statistics()
        assert st["listener"]["accepted"] == 1 and b.listener is app
        assert st.get("claims", []) == [] and "other" not in st["owners"]
        for s in (sa, sb, out["c"], out["app"]):
            await s.aclose()
