"""The BEP 15 UDP tracker client: the sans-I/O core with explicit ``now``
(exact retransmission times, connection-id reuse), then the trio driver
over a utp Endpoint against opentracker (Debian's whitelist build, started
here on loopback) and against a small IPv6 tracker written in the test;
last, utp.rendezvous and ``ucat --rendezvous`` through that opentracker.
"""

from __future__ import annotations

import hashlib
import os
import random
import socket
import struct
import subprocess
import tempfile
import time

import pytest
import trio

import tracker
import utp
from testsupport import opentracker as run_opentracker
from testsupport import unavailable
from tracker import (
    AnnounceResult, RequestTimedOut, ScrapeResult, TrackerFailure, UDPTrackerProtocol,
)

HASH = hashlib.sha1(b"utpkit test swarm").digest()
OTHER = hashlib.sha1(b"utpkit second swarm").digest()
NOT_LISTED = hashlib.sha1(b"not on the whitelist").digest()
# Keys the rendezvous tests meet with (on the whitelist too).
RENDEZVOUS_KEYS = ["meet-utp", "meet-alone", "meet-ucat"]
PEER_ID = b"-UK0100-abcdefghijkl"


# ---- the sans-I/O core -------------------------------------------------------------


def _connect_reply(req: bytes, conn_id: bytes = b"\x11" * 8) -> bytes:
    protocol, action, tid = struct.unpack(">QII", req)
    assert protocol == 0x41727101980 and action == 0
    return struct.pack(">II", 0, tid) + conn_id


def _tid(req: bytes) -> int:
    return struct.unpack_from(">I", req, 12)[0]


TRACKER = ("198.18.0.1", 6969)
TRACKER6 = ("2001:db8::69", 6969)


def _proto(**options) -> UDPTrackerProtocol:
    """A core for TRACKER (TRACKER6 with ipv6=True), seeded."""
    return UDPTrackerProtocol(TRACKER6 if options.get("ipv6") else TRACKER,
                              rng=random.Random(15), **options)


def _out(p: UDPTrackerProtocol, now: float) -> list[bytes]:
    """The core's datagrams (all addressed to its tracker), without the address."""
    out = p.datagrams_to_send(now)
    assert all(addr == p.address for _, addr in out)
    return [data for data, _ in out]


def _receive(p: UDPTrackerProtocol, data: bytes, now: float) -> None:
    p.receive_datagram(data, p.address, now)


def test_connect_then_announce_wire_format():
    p = _proto(retry_base=15)
    rid = p.announce(HASH, PEER_ID, 6881, now=0.0, event=tracker.EVENT_STARTED, left=5,
                     numwant=50, key=7)
    (connect,) = _out(p, 0.0)
    assert len(connect) == 16
    _receive(p, _connect_reply(connect), 0.1)
    (ann,) = _out(p, 0.1)
    assert len(ann) == 98
    assert ann[:8] == b"\x11" * 8 and struct.unpack_from(">I", ann, 8)[0] == 1
    assert ann[16:36] == HASH and ann[36:56] == PEER_ID
    downloaded, left, uploaded, event, ip, key, numwant, port = struct.unpack_from(">qqqiIIiH", ann, 56)
    assert (downloaded, left, uploaded, event, ip, key, numwant, port) == (0, 5, 0, 2, 0, 7, 50, 6881)
    peers = socket.inet_aton("198.18.0.10") + struct.pack(">H", 4000) \
        + socket.inet_aton("198.18.0.11") + struct.pack(">H", 5000)
    _receive(p, struct.pack(">IIIII", 1, _tid(ann), 1800, 3, 4) + peers, 0.2)
    ev = p.next_event()
    assert ev == AnnounceResult(rid, 1800, 3, 4, (("198.18.0.10", 4000), ("198.18.0.11", 5000)))
    assert p.next_event() is None and p.get_timer() is None


def test_retransmission_schedule_is_15_times_2_to_the_n():
    p = _proto()
    rid = p.announce(HASH, PEER_ID, 6881, now=0.0)
    sends = []
    now = 0.0
    while True:
        if _out(p, now):
            sends.append(now)
        ev = p.next_event()
        if ev is not None:
            break
        now = p.get_timer()
        p.handle_timer(now)
    # Sent at 0, 15, 45, 105, ... (waits 15, 30, 60, ... 3840 s), then given up.
    assert sends == [0, 15, 45, 105, 225, 465, 945, 1905, 3825]
    assert isinstance(ev, RequestTimedOut) and ev.request_id == rid
    assert ev.sent == 9 and now == 3825 + 3840


def test_shortened_schedule():
    p = _proto(retry_base=0.5, max_retries=2)
    p.scrape([HASH], now=10.0)
    times = [10.0]
    _out(p, 10.0)
    while (t := p.get_timer()) is not None:
        p.handle_timer(t)
        if _out(p, t):
            times.append(t)
    assert times == [10.0, 10.5, 11.5]
    assert isinstance(p.next_event(), RequestTimedOut)


def test_connection_id_is_reused_for_one_minute():
    p = _proto()
    p.announce(HASH, PEER_ID, 1, now=0.0)
    (c,) = _out(p, 0.0)
    _receive(p, _connect_reply(c, b"\x22" * 8), 1.0)
    (a,) = _out(p, 1.0)
    _receive(p, struct.pack(">IIIII", 1, _tid(a), 60, 0, 0), 1.1)
    assert isinstance(p.next_event(), AnnounceResult)
    # 59.9 s after the connect answer: straight to the request.
    p.scrape([HASH], now=60.9)
    (s,) = _out(p, 60.9)
    assert len(s) == 36 and s[:8] == b"\x22" * 8
    _receive(p, struct.pack(">IIIII", 2, _tid(s), 1, 2, 3), 61.0)
    assert p.next_event() == ScrapeResult(2, ((1, 2, 3),))
    # A minute after it: a new connect first.
    p.announce(HASH, PEER_ID, 1, now=61.0)
    (c2,) = _out(p, 61.0)
    assert len(c2) == 16 and struct.unpack_from(">Q", c2)[0] == 0x41727101980


def test_connection_id_expiring_during_retries_reconnects():
    p = _proto()
    p.announce(HASH, PEER_ID, 1, now=0.0)
    (c,) = _out(p, 0.0)
    _receive(p, _connect_reply(c), 0.0)
    _out(p, 0.0)                      # announce at 0
    p.handle_timer(15.0)
    assert len(_out(p, 15.0)[0]) == 98  # id still valid: resend
    p.handle_timer(45.0)
    (again,) = _out(p, 45.0)            # 45 s > ... still < 60: resend
    assert len(again) == 98
    p.handle_timer(105.0)
    (connect,) = _out(p, 105.0)         # expired: connect again
    assert len(connect) == 16


def test_ipv6_peers_and_garbage():
    p = _proto(ipv6=True)
    rid = p.announce(HASH, PEER_ID, 1, now=0.0)
    (c,) = _out(p, 0.0)
    # Garbage and answers to transactions we never started are dropped.
    _receive(p, b"\x00\x00", 0.0)
    _receive(p, struct.pack(">II", 0, 12345) + b"\x00" * 8, 0.0)
    assert p.counters["dropped"] == 2
    _receive(p, _connect_reply(c), 0.0)
    (a,) = _out(p, 0.0)
    # A truncated peer entry: malformed, dropped, still waiting.
    _receive(p, struct.pack(">IIIII", 1, _tid(a), 1, 0, 0) + b"\x00" * 7, 0.0)
    assert p.next_event() is None
    six = socket.inet_pton(socket.AF_INET6, "2001:db8::1") + struct.pack(">H", 7000)
    _receive(p, struct.pack(">IIIII", 1, _tid(a), 1, 0, 1) + six, 0.0)
    assert p.next_event() == AnnounceResult(rid, 1, 0, 1, (("2001:db8::1", 7000),))


def test_error_answers():
    p = _proto()
    rid = p.announce(HASH, PEER_ID, 1, now=0.0)
    (c,) = _out(p, 0.0)
    _receive(p, _connect_reply(c), 0.0)
    (a,) = _out(p, 0.0)
    _receive(p, struct.pack(">II", 3, _tid(a)) + b"go away\x00\x07", 0.0)
    assert p.next_event() == TrackerFailure(rid, "go away??")
    rid2 = p.announce(HASH, PEER_ID, 1, now=1.0)
    (a2,) = _out(p, 1.0)
    _receive(p, struct.pack(">II", 1, _tid(a2)), 1.0)
    ev = p.next_event()
    assert isinstance(ev, TrackerFailure) and ev.request_id == rid2 and "whitelist" in ev.message
    with pytest.raises(tracker.LocalProtocolError):
        p.announce(b"short", PEER_ID, 1, now=0.0)
    with pytest.raises(tracker.LocalProtocolError):
        p.scrape([], now=0.0)


def test_parse_tracker_url():
    assert tracker.parse_tracker_url("udp://198.18.0.2:6969") == ("198.18.0.2", 6969)
    assert tracker.parse_tracker_url("udp://[::1]:80/announce") == ("::1", 80)
    for bad in ("http://x:1", "udp://x", "udp://x:0", "udp://:5"):
        with pytest.raises(ValueError):
            tracker.parse_tracker_url(bad)


# ---- against opentracker on loopback --------------------------------------------------


@pytest.fixture(scope="module")
def opentracker():
    """opentracker on 127.0.0.1 with HASH, OTHER and the rendezvous keys on
    its whitelist; yields its (ip, port)."""
    keys = [hashlib.sha1(k.encode()).digest() for k in RENDEZVOUS_KEYS]
    with run_opentracker([HASH, OTHER, *keys]) as addr:
        yield addr


async def test_announce_and_scrape_against_opentracker(opentracker):
    async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.1", 0) as b, \
            tracker.open_tracker_client(a, retry_base=1) as ta, \
            tracker.open_tracker_client(b, retry_base=1) as tb:
        pa, pb = a.local_address[1], b.local_address[1]
        ra = await ta.announce(opentracker, HASH, event=tracker.EVENT_STARTED, left=1)
        assert ("127.0.0.1", pa) in ra.peers
        rb = await tb.announce(opentracker, HASH, event=tracker.EVENT_STARTED)
        assert {("127.0.0.1", pa), ("127.0.0.1", pb)} <= set(rb.peers)
        assert rb.interval > 0
        scrape = await ta.scrape(opentracker, [HASH, OTHER])
        seeders, completed, leechers = scrape.files[0]
        assert seeders + leechers >= 2
        assert scrape.files[1] == (0, 0, 0)
        # Stopped: B leaves the swarm.
        await tb.announce(opentracker, HASH, event=tracker.EVENT_STOPPED)
        ra2 = await ta.announce(opentracker, HASH)
        assert ("127.0.0.1", pb) not in ra2.peers
        # Four requests, one connect: the connection id was reused.
        stats = ta.statistics()[f"127.0.0.1:{opentracker[1]}"]
        assert stats["connects"] == 1 and stats["retransmits"] == 0


async def test_hash_not_on_the_whitelist(opentracker):
    async with utp.open_endpoint("127.0.0.1", 0) as a, tracker.open_tracker_client(a) as ta:
        with pytest.raises(tracker.TrackerError, match="whitelist"):
            await ta.announce(opentracker, NOT_LISTED)


async def test_tracker_shares_the_socket_with_utp(opentracker):
    # uTP traffic and tracker answers on one port at the same time.
    async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.1", 0) as b, \
            tracker.open_tracker_client(a) as ta:
        listener = b.listen()
        async with trio.open_nursery() as n:
            n.start_soon(listener.accept)
            stream = await a.connect(b.local_address)
        r = await ta.announce(opentracker, OTHER)
        assert ("127.0.0.1", a.local_address[1]) in r.peers
        await stream.aclose()


async def test_silent_tracker_times_out_on_the_shortened_schedule():
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        async with utp.open_endpoint("127.0.0.1", 0) as a, \
                tracker.open_tracker_client(a, retry_base=0.05, max_retries=2) as ta:
            t0 = trio.current_time()
            with pytest.raises(TimeoutError, match=r"3 requests sent over 0\.[34] s"):
                await ta.scrape(silent.getsockname(), [HASH])
            assert 0.3 <= trio.current_time() - t0 < 1.5


async def test_ipv6_tracker_answers_with_18_byte_peers():
    if not socket.has_ipv6:
        unavailable("this Python was built without IPv6", "CI needs IPv6 on loopback")
    sock = trio.socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    try:
        await sock.bind(("::1", 0))
    except OSError:
        unavailable("no IPv6 loopback (::1) on this machine", "CI needs ::1 on lo")
    peer = socket.inet_pton(socket.AF_INET6, "2001:db8::7") + struct.pack(">H", 6881)

    async def fake_tracker():
        while True:
            data, addr = await sock.recvfrom(2048)
            action, tid = struct.unpack_from(">II", data, 8)
            if action == 0:
                await sock.sendto(struct.pack(">II", 0, tid) + b"\x42" * 8, addr)
            elif action == 1:
                assert data[:8] == b"\x42" * 8
                await sock.sendto(struct.pack(">IIIII", 1, tid, 900, 0, 1) + peer, addr)

    with sock:
        async with trio.open_nursery() as n:
            n.start_soon(fake_tracker)
            async with utp.open_endpoint("::1", 0) as ep, tracker.open_tracker_client(ep) as tc:
                r = await tc.announce(sock.getsockname()[:2], HASH)
                assert r.peers == (("2001:db8::7", 6881),)
            n.cancel_scope.cancel()


# ---- rendezvous through the tracker (loopback: no NAT, the same path) ---------------


def test_split_peers_tells_us_from_the_peer():
    from utp._rendezvous import RendezvousError, split_peers
    peers = (("198.18.0.10", 4000), ("198.18.0.11", 5000))
    assert split_peers(peers, ("0.0.0.0", 4000)) == (("198.18.0.10", 4000), [("198.18.0.11", 5000)])
    assert split_peers(peers[:1], ("0.0.0.0", 4000)) == (("198.18.0.10", 4000), [])
    assert split_peers(peers[1:], ("0.0.0.0", 4000)) == (None, [("198.18.0.11", 5000)])
    same = (("198.18.0.10", 4000), ("198.18.0.11", 4000))
    # The same port on both: the bound address decides, else it is an error.
    assert split_peers(same, ("198.18.0.11", 4000))[0] == ("198.18.0.11", 4000)
    with pytest.raises(RendezvousError, match="same port 4000"):
        split_peers(same, ("0.0.0.0", 4000))


async def test_rendezvous_connects_two_endpoints(opentracker):
    lines = []
    async with utp.open_endpoint("127.0.0.1", 0) as a, utp.open_endpoint("127.0.0.1", 0) as b:
        got = {}

        async def side(name, ep, delay):
            await trio.sleep(delay)
            got[name] = await utp.rendezvous(ep, "meet-utp", via=f"udp://{opentracker[0]}:{opentracker[1]}",
                                             timeout=10, log=lines.append)

        async with trio.open_nursery() as n:
            n.start_soon(side, "a", a, 0)
            n.start_soon(side, "b", b, 0.3)
        sa, sb = got["a"], got["b"]
        assert sa.peer_address[1] == b.local_address[1]
        assert sb.peer_address[1] == a.local_address[1]
        await sa.send_all(b"ping")
        assert await sb.receive_some() == b"ping"
        await sb.send_all(b"pong")
        assert await sa.receive_some() == b"pong"
        await sa.aclose()
        await sb.aclose()
    assert sum("punching as the initiator" in line for line in lines) == 1
    assert sum("punching as the responder" in line for line in lines) == 1


async def test_rendezvous_alone_times_out(opentracker):
    async with utp.open_endpoint("127.0.0.1", 0) as a:
        t0 = trio.current_time()
        with pytest.raises(TimeoutError, match="no other peer announced the key"):
            await utp.rendezvous(a, "meet-alone", via=opentracker, timeout=1.5)
        assert trio.current_time() - t0 < 3.5


def _ucat_env() -> dict:
    """Import utp, tracker and ucat where this process does (the source
    tree by hand, the installed wheel in CI), from a neutral directory."""
    import importlib.util
    env = dict(os.environ)
    roots = []
    for name in ("utp", "tracker", "ucat"):
        root = os.path.dirname(os.path.dirname(importlib.util.find_spec(name).origin))
        if root not in roots:
            roots.append(root)
    env["PYTHONPATH"] = os.pathsep.join(roots)
    return env


def test_ucat_rendezvous_end_to_end(opentracker, tmp_path):
    import sys
    data = {side: os.urandom(1 << 20) for side in "ab"}
    url = f"udp://{opentracker[0]}:{opentracker[1]}"
    procs = {}
    for side in "ab":
        (tmp_path / f"{side}.in").write_bytes(data[side])
        with open(tmp_path / f"{side}.in", "rb") as fin, open(tmp_path / f"{side}.out", "wb") as fout:
            procs[side] = subprocess.Popen(
                [sys.executable, "-m", "ucat", "--rendezvous", "meet-ucat", "--tracker", url, "-w", "15"],
                stdin=fin, stdout=fout, stderr=subprocess.PIPE, cwd=tmp_path, env=_ucat_env())
        time.sleep(0.2)
    for side, proc in procs.items():
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err.decode()
    assert (tmp_path / "a.out").read_bytes() == data["b"]
    assert (tmp_path / "b.out").read_bytes() == data["a"]


def test_ucat_rendezvous_arguments():
    import sys
    for argv, message in (
        (["--rendezvous", "k"], "needs --tracker"),
        (["--tracker", "udp://127.0.0.1:1"], "needs --rendezvous"),
        (["--rendezvous", "k", "--tracker", "http://x:1"], "not a UDP tracker URL"),
        (["--rendezvous", "k", "--tracker", "udp://127.0.0.1:1", "-l"], "takes no host"),
        (["--rendezvous", "k", "--tracker", "udp://127.0.0.1:1", "h", "1"], "takes no host"),
    ):
        r = subprocess.run([sys.executable, "-m", "ucat", *argv], capture_output=True, text=True,
                           env=_ucat_env(), cwd=tempfile.gettempdir())
        assert r.returncode == 2 and message in r.stderr, (argv, r.stderr)


async def test_rendezvous_names_a_silent_tracker_not_the_peer():
    """A tracker that never answers (bound, silent: no ICMP either) is
    named as such when the deadline passes, not blamed on a missing peer."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as silent:
        silent.bind(("127.0.0.1", 0))
        where = "127.0.0.1:%d" % silent.getsockname()[1]
        async with utp.open_endpoint("127.0.0.1", 0) as ep:
            with pytest.raises(TimeoutError, match=r"^tracker udp://%s did not answer in " % where):
                await utp.rendezvous(ep, "silent", via=f"udp://{where}", timeout=2.0)


async def test_rendezvous_at_a_closed_port_is_refused_at_once():
    """Nothing bound there: the kernel's ICMP port unreachable ends the
    rendezvous at once with ConnectionRefusedError naming the tracker."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        where = "127.0.0.1:%d" % probe.getsockname()[1]
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        with trio.fail_after(10):
            with pytest.raises(ConnectionRefusedError,
                               match=r"tracker udp://%s did not answer \(ICMP port unreachable" % where):
                await utp.rendezvous(ep, "closed", via=f"udp://{where}", timeout=30.0)
