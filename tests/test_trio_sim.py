"""The trio layer over a simulated lossy network on trio's virtual clock.

Every test here takes ``autojump_clock``: time only moves when all tasks
wait, so timeouts and retry schedules are exact and minutes of protocol time
take milliseconds.
"""

from __future__ import annotations

import hashlib
import random
import sys

import pytest
import trio
import trio.testing

import utp
from utp.simnet import SimNetwork
from testsupport import clog, clogged

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

A, B = "10.0.0.1", "10.0.0.2"
PORT = 6881


def _type(data: bytes) -> int:
    return data[0] >> 4


ST_DATA, ST_FIN, ST_STATE, ST_RESET, ST_SYN = range(5)


# ---- trio's own conformance checks -------------------------------------------------


def _stream_maker(**link):
    async def make():
        net = SimNetwork(seed=random.getrandbits(32), **link)
        # The network and endpoints must outlive the check's use of the
        # streams; trio's checkers call the maker inside their own nursery,
        # so run everything in a system-owned nursery of this test.
        holder = _stream_maker.nursery
        ready = trio.Event()
        box: dict = {}

        async def run():
            async with net, net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
                listener = b.listen()
                async with trio.open_nursery() as n:
                    async def acc():
                        box["b"] = await listener.accept()
                    n.start_soon(acc)
                    box["a"] = await a.connect((B, PORT))
                ready.set()
                await trio.sleep_forever()

        holder.start_soon(run)
        await ready.wait()
        return box["a"], box["b"]
    return make


@pytest.mark.parametrize("link", [
    {"delay": 0.010},
    {"delay": 0.020, "loss": 0.03, "duplicate": 0.02, "reorder": 0.05, "jitter": 0.005},
], ids=["clean", "lossy"])
async def test_check_half_closeable_stream_simulated(autojump_clock, nursery, link):
    random.seed(7)
    _stream_maker.nursery = nursery
    make = _stream_maker(**link)
    # Virtual time is free: wait out retransmission back-off before calling
    # a stream clogged.
    await trio.testing.check_half_closeable_stream(make, clogged(make, quiet=30.0))
    nursery.cancel_scope.cancel()


# ---- connect with timeout-retry -------------------------------------------------------


async def test_connect_attempt_schedule_is_exact(autojump_clock):
    async with SimNetwork(seed=1, trace=True, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a:
            t0 = trio.current_time()
            with pytest.raises(TimeoutError, match=r"4 attempts in 7\.5 s"):
                await a.connect(("10.9.9.9", PORT), attempt_timeout=2.0, timeout=7.5)
            assert trio.current_time() - t0 == pytest.approx(7.5)
            syns = [(round(t - t0, 6), data[2:4]) for t, _, _, data in net.trace
                    if _type(data) == ST_SYN]
            # Engine SYN schedule inside each attempt: 0 and +1 s (SYN_TIMEOUT
            # 1 s); every attempt is a new connection with a new id.
            assert [t for t, _ in syns] == [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0]
            ids = [cid for _, cid in syns]
            assert ids[0] == ids[1] and ids[2] == ids[3] and ids[4] == ids[5] and ids[6] == ids[7]
            assert len({ids[0], ids[2], ids[4], ids[6]}) == 4
            # Nothing left behind: every attempt's socket was closed.
            assert a.statistics()["engine"]["sockets_live"] == 0


async def test_connect_deadline_is_absolute(autojump_clock):
    async with SimNetwork(seed=1) as net:
        async with net.endpoint(A, PORT) as a:
            t0 = trio.current_time()
            with pytest.raises(TimeoutError):
                await a.connect(("10.9.9.9", PORT), attempt_timeout=1.5, timeout=None,
                                deadline=t0 + 4.0)
            assert trio.current_time() - t0 == pytest.approx(4.0)


async def test_connect_gets_through_after_the_path_opens(autojump_clock):
    """The NAT case: the first attempts are lost, a later one connects."""
    async with SimNetwork(seed=3, delay=0.02) as net:
        net.set_link(A, B, up=False)
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            listener = b.listen()
            t0 = trio.current_time()

            async def open_path():
                await trio.sleep(5.0)
                net.set_link(A, B, up=True)

            async with trio.open_nursery() as n:
                n.start_soon(open_path)
                stream = await a.connect((B, PORT), attempt_timeout=2.0, timeout=30.0)
                peer = await listener.accept()
            # Attempts start at 0, 2, 4, 6: the one at 6 s is the first after
            # the path opened at 5 s (the SYN of the 4 s attempt at 5 s races
            # the opening and may win).
            assert 5.0 <= trio.current_time() - t0 <= 6.1
            await stream.send_all(b"hello")
            assert await peer.receive_some() == b"hello"
            # Only one connection exists on the listening side.
            assert b.statistics()["engine"]["sockets_live"] == 1


async def test_connect_refused_is_quick(autojump_clock):
    async with SimNetwork(seed=1, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT):
            t0 = trio.current_time()
            with pytest.raises(ConnectionRefusedError, match="refused"):
                await a.connect((B, PORT))
            assert trio.current_time() - t0 < 0.1


async def test_connect_cancelled_leaves_nothing_half_open(autojump_clock):
    async with SimNetwork(seed=1, delay=0.01, trace=True) as net:
        net.set_link(A, B, up=False)
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            b.listen()
            with trio.move_on_after(1.5):
                await a.connect((B, PORT), attempt_timeout=5.0, timeout=10.0)
            assert a.statistics()["engine"]["sockets_live"] == 0
            sent = len(net.trace)
            await trio.sleep(10)
            assert len(net.trace) == sent  # no SYN after the cancel


@pytest.mark.parametrize("addr, message", [
    (("example.org", 80), "not a literal IP"),
    ((A, 0), "bad port"),
    ((A, 70000), "bad port"),
    ("10.0.0.2:80", "expected a"),
])
async def test_connect_rejects_bad_addresses(autojump_clock, addr, message):
    async with SimNetwork(seed=1) as net:
        async with net.endpoint(A, PORT) as a:
            with pytest.raises(OSError, match=message):
                await a.connect(addr)


# ---- streams: errors, flow control ------------------------------------------------------


async def test_peer_reset_breaks_the_stream_with_cause(autojump_clock):
    async with SimNetwork(seed=1, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            s, accepted, listener = await _connect_pair(a, b)
            accepted.abort()  # the peer resets the connection
            with pytest.raises(trio.BrokenResourceError) as info:
                await s.receive_some()
            assert isinstance(info.value.__cause__, utp.UTPError)
            assert info.value.__cause__.code == utp.UTP_ECONNRESET
            with pytest.raises(trio.BrokenResourceError):
                await s.send_all(b"x")
            await s.aclose()
            with pytest.raises(trio.ClosedResourceError):
                await s.send_all(b"x")


async def _connect_pair(a, b, **listen):
    """a connects to b's new listener: (a's stream, b's stream, listener)."""
    listener = b.listen(**listen)
    box = {}

    async def accept():
        box["s"] = await listener.accept()

    async with trio.open_nursery() as n:
        n.start_soon(accept)
        stream = await a.connect((B, PORT))
    return stream, box["s"], listener


async def test_dead_peer_breaks_a_waiting_receiver(autojump_clock):
    async with SimNetwork(seed=1, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            s, accepted, listener = await _connect_pair(a, b)
            net.set_link(A, B, up=False)
            t0 = trio.current_time()
            with pytest.raises(trio.BrokenResourceError) as info:
                await s.receive_some()
            assert info.value.__cause__.code == utp.UTP_ETIMEDOUT
            # 29 s keepalive, then probes backing off from the 500 ms RTO floor.
            assert 29 < trio.current_time() - t0 < 120


async def test_slow_reader_bounds_memory_and_slows_sender(autojump_clock):
    rcv = 64 * 1024
    async with SimNetwork(seed=1, delay=0.005) as net:
        async with net.endpoint(A, PORT, recv_buffer=rcv) as a, \
                net.endpoint(B, PORT, recv_buffer=rcv) as b:
            s, accepted, listener = await _connect_pair(a, b)
            peer = accepted
            sent = 0

            async def writer():
                nonlocal sent
                chunk = b"z" * 16384
                while True:
                    await s.send_all(chunk)
                    sent += len(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(writer)
                await trio.sleep(30)  # the reader reads nothing for 30 s
                # The receiver holds at most its window (+ slack for probes).
                assert peer._sock.readable <= rcv + 3 * 1500
                # The sender is blocked: its engine buffer is full, nothing more.
                sent_at_stall = sent
                await trio.sleep(10)
                assert sent == sent_at_stall
                got = 0
                while got < 4 * 1024 * 1024:
                    got += len(await peer.receive_some())
                n.cancel_scope.cancel()
            assert sent > sent_at_stall


async def test_wait_send_all_might_not_block_wakes_when_acks_drain_the_buffer(autojump_clock):
    """A full stream whose reader starts draining: the wait ends once half
    the buffer is free, whether or not the engine reports "writable"; and
    after a send_all that returned, it does not block (issue 13)."""
    async with SimNetwork(seed=3, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            s, peer, listener = await _connect_pair(a, b)
            sndbuf = s._sock.get_option(utp.UTP_SNDBUF)
            await clog(s, quiet=30.0)
            assert s.statistics()["send_queue"] > sndbuf // 2
            async with trio.open_nursery() as n:
                async def drain():
                    while await peer.receive_some():
                        pass
                n.start_soon(drain)
                with trio.fail_after(5):
                    await s.wait_send_all_might_not_block()
                assert s.statistics()["send_queue"] <= sndbuf // 2
                await s.send_all(b"z" * (sndbuf + sndbuf // 2))
                with trio.fail_after(5):
                    await s.wait_send_all_might_not_block()
                await s.send_eof()


async def test_close_wakes_a_task_in_wait_send_all_might_not_block(autojump_clock):
    async with SimNetwork(seed=4, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            s, peer, listener = await _connect_pair(a, b)
            await clog(s, quiet=30.0)
            result = []

            async def waiter():
                try:
                    await s.wait_send_all_might_not_block()
                    result.append("returned")
                except trio.ClosedResourceError:
                    result.append("closed")
            async with trio.open_nursery() as n:
                n.start_soon(waiter)
                await trio.testing.wait_all_tasks_blocked()
                assert result == []
                await s.aclose()
            assert result == ["closed"]


async def test_concurrent_senders_are_busy(autojump_clock):
    async with SimNetwork(seed=1, delay=0.01) as net:
        async with net.endpoint(A, PORT, send_buffer=16384) as a, net.endpoint(B, PORT) as b:
            s, accepted, listener = await _connect_pair(a, b)
            # trio >= 0.25 wraps what a nursery raises in an ExceptionGroup.
            with pytest.raises((trio.BusyResourceError, BaseExceptionGroup)) as info:
                async with trio.open_nursery() as n:
                    n.start_soon(s.send_all, b"x" * 1_000_000)
                    n.start_soon(s.send_all, b"y" * 1_000_000)
            if isinstance(info.value, BaseExceptionGroup):
                assert info.value.subgroup(trio.BusyResourceError) is not None


# ---- listener ---------------------------------------------------------------------------


async def test_serve_listeners_echo_and_pause_refuses(autojump_clock):
    async with SimNetwork(seed=2, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            listener = b.listen()

            async def echo(stream):
                async for chunk in stream:
                    await stream.send_all(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(trio.serve_listeners, echo, [listener])
                s = await a.connect((B, PORT))
                data = random.Random(1).randbytes(300_000)
                async with trio.open_nursery() as n2:
                    n2.start_soon(s.send_all, data)
                    got = bytearray()
                    while len(got) < len(data):
                        got += await s.receive_some()
                assert got == data
                await s.aclose()

                listener.pause()
                t0 = trio.current_time()
                with pytest.raises(ConnectionRefusedError):
                    await a.connect((B, PORT))
                assert trio.current_time() - t0 < 0.1
                listener.resume()
                s2 = await a.connect((B, PORT))
                await s2.send_all(b"again")
                assert await s2.receive_some() == b"again"
                await s2.aclose()
                n.cancel_scope.cancel()


async def test_backlog_overflow_is_refused_and_counted(autojump_clock):
    async with SimNetwork(seed=2, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            listener = b.listen(backlog=2)
            streams = [await a.connect((B, PORT)) for _ in range(4)]
            await trio.sleep(1)
            assert listener.statistics()["refused_backlog"] == 2
            broken = 0
            for s in streams:
                try:
                    with trio.fail_after(5):
                        await s.receive_some()
                except trio.BrokenResourceError:
                    broken += 1
                except trio.TooSlowError:
                    pass
            assert broken == 2


async def test_firewall_refuses_and_errors_reach_accept(autojump_clock):
    async with SimNetwork(seed=2, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b, \
                net.endpoint("10.0.0.3", PORT) as c:
            listener = b.listen()
            listener.firewall = lambda addr: addr[0] != A
            # Refused before the SYN-ACK: the connect itself fails, at once.
            t0 = trio.current_time()
            with pytest.raises(ConnectionRefusedError):
                await a.connect((B, PORT))
            assert trio.current_time() - t0 < 0.1
            assert listener.statistics()["refused_firewall"] == 1
            assert b.statistics()["engine"]["live_sockets"] == 0
            s3 = await c.connect((B, PORT))
            peer = await listener.accept()
            assert peer.peer_address[0] == "10.0.0.3"
            await s3.aclose()

            def boom(addr):
                raise RuntimeError("firewall broke")
            listener.firewall = boom
            with pytest.raises(ConnectionRefusedError):
                await a.connect((B, PORT))
            with pytest.raises(RuntimeError, match="firewall broke"):
                with trio.fail_after(5):
                    await listener.accept()
            assert listener.statistics()["accepted"] == 1


async def test_claim_incoming_takes_its_addresses_and_leaves_the_rest(autojump_clock):
    async with SimNetwork(seed=3, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b, \
                net.endpoint("10.0.0.3", PORT) as c:
            app = b.listen()
            claim = b.claim_incoming(lambda addr: addr[0] == A, backlog=1)
            assert b.listener is app
            sa = await a.connect((B, PORT))
            sc = await c.connect((B, PORT))
            got_a = await claim.accept()
            got_c = await app.accept()
            assert got_a.peer_address[0] == A and got_c.peer_address[0] == "10.0.0.3"
            await sa.send_all(b"to the claim")
            assert await got_a.receive_some() == b"to the claim"
            assert b.statistics()["claims"][0]["accepted"] == 1
            # A claim's firewall refuses outright, like a listener's.
            claim.firewall = lambda addr: False
            with pytest.raises(ConnectionRefusedError):
                await a.connect((B, PORT))
            assert claim.statistics()["refused_firewall"] == 1
            # Closed, the claim is gone and its addresses reach the app again.
            await claim.aclose()
            sa2 = await a.connect((B, PORT))
            assert (await app.accept()).peer_address[0] == A
            # No app listener: unclaimed peers are refused and counted.
            await app.aclose()
            claim2 = b.claim_incoming(lambda addr: addr[0] == A)
            with pytest.raises(ConnectionRefusedError):
                await c.connect((B, PORT))
            assert b.statistics()["refused_unclaimed"] == 1
            await claim2.aclose()
            for s in (sa, sc, sa2):
                await s.aclose()


# ---- the shared socket --------------------------------------------------------------------


async def test_datagrams_of_other_owners_share_the_socket(autojump_clock):
    async with SimNetwork(seed=4, delay=0.01) as net:
        async with net.endpoint(A, PORT) as a, net.endpoint(B, PORT) as b:
            dht = b.datagram_queue("dht", maxlen=4)
            tracker = b.datagram_queue("tracker")
            ping = b"d1:ad2:id20:" + b"x" * 20 + b"e1:q4:ping1:t2:aa1:y1:qe"
            connect_req = (0x41727101980).to_bytes(8, "big") + (0).to_bytes(4, "big") + b"tran"
            s, accepted, listener = await _connect_pair(a, b)
            payload = random.Random(2).randbytes(2_000_000)
            async with trio.open_nursery() as n:
                n.start_soon(s.send_all, payload)
                for _ in range(3):
                    await a.sendto(ping, (B, PORT))
                    await a.sendto(connect_req, (B, PORT))
                    await a.sendto(b"\xff garbage", (B, PORT))
                h = hashlib.sha256()
                got = 0
                while got < len(payload):
                    chunk = await accepted.receive_some()
                    h.update(chunk)
                    got += len(chunk)
            assert h.digest() == hashlib.sha256(payload).digest()
            data, src = await dht.receive()
            assert data == ping and src == (A, PORT)
            assert (await tracker.receive())[0] == connect_req
            stats = b.statistics()
            assert stats["owners"]["dht"]["received"] == 3
            assert stats["owners"]["tracker"]["received"] == 3
            assert stats["owners"]["other"]["unowned_dropped"] == 3
            assert stats["engine"]["packets_in"] > 1000
            # A full queue drops and counts.
            for _ in range(10):
                await a.sendto(ping, (B, PORT))
            await trio.sleep(1)
            assert b.statistics()["owners"]["dht"]["dropped"] > 0
            with pytest.raises(ValueError):
                b.datagram_queue("bogus")
            with pytest.raises(RuntimeError):
                b.datagram_queue("dht")


async def test_endpoint_close_lingers_until_data_is_acknowledged(autojump_clock):
    async with SimNetwork(seed=5, delay=0.05, loss=0.02) as net:
        payload = random.Random(3).randbytes(1_000_000)
        got = bytearray()
        async with net.endpoint(B, PORT) as b:
            listener = b.listen()

            async def reader():
                s = await listener.accept()
                async for chunk in s:
                    got.extend(chunk)

            async with trio.open_nursery() as n:
                n.start_soon(reader)
                async with net.endpoint(A, PORT) as a:
                    s = await a.connect((B, PORT))
                    await s.send_all(payload)
                    await s.send_eof()
                # Leaving the block waited for the data to be acknowledged.
                assert bytes(got) == payload


async def test_external_address_votes(autojump_clock):
    async with SimNetwork(seed=1) as net:
        async with net.endpoint(A, PORT) as a:
            assert a.external_address is None
            a.vote_external_address(("198.18.0.5", 4000), reporter=("1.1.1.1", 1), source="dht")
            assert a.external_address == ("198.18.0.5", 4000)
            # One peer repeating itself is still one vote.
            for _ in range(5):
                a.vote_external_address(("198.18.0.9", 4001), reporter=("2.2.2.2", 7), source="dht")
            a.vote_external_address(("198.18.0.5", 4000), reporter=("3.3.3.3", 1), source="tracker")
            assert a.external_address == ("198.18.0.5", 4000)
            stats = a.statistics()["external_address"]
            assert stats["reporters"] == 3 and stats["by_source"] == {"dht": 2, "tracker": 1}


class _DropFinAck(SimNetwork):
    """Drops the one ACK that B sends for A's FIN."""

    fin_seen = False
    dropped = 0

    def _send(self, src, dst, data):
        if src[0] == A and data[0] >> 4 == ST_FIN:
            self.fin_seen = True
        if src[0] == B and data[0] >> 4 == ST_STATE and self.fin_seen and not self.dropped:
            self.dropped += 1
            return
        super()._send(src, dst, data)


async def test_lost_last_ack_is_answered_after_close(autojump_clock):
    """TIME_WAIT: B closes right after acknowledging A's FIN and that ACK is
    lost.  A resends its FIN; the engine remembers the closed connection and
    ACKs it again instead of resetting, so A ends cleanly."""
    async with _DropFinAck(seed=1, delay=0.01) as net, net.endpoint(A, PORT) as a, \
            net.endpoint(B, PORT) as b:
        sa, accepted, listener = await _connect_pair(a, b)
        sb = accepted
        events = []
        sa.on_state_change = events.append
        await sb.send_eof()
        await trio.sleep(0.5)
        await sa.send_all(b"x" * 3000)
        await sa.send_eof()
        got = b""
        while chunk := await sb.receive_some():
            got += chunk
        assert len(got) == 3000
        await sb.aclose()
        await sa.wait_send_complete()
        assert await sa.receive_some() == b""
        await trio.sleep(5)
        assert net.dropped == 1
        # No reset: the resent FIN was acknowledged.
        assert not [e for e in events if e.startswith("error")], events


class _DropAcksOfTail(SimNetwork):
    """Once A has sent data after B's FIN, drops every ACK B sends (ST_STATE)
    for ``window`` seconds: A's tail and FIN arrive, but A hears of none
    of it and retransmits."""

    window = 0.3
    since: float | None = None
    dropped = 0

    def _send(self, src, dst, data):
        if src[0] == A and data[0] >> 4 in (ST_DATA, ST_FIN) and self.armed and self.since is None:
            self.since = trio.current_time()
        if (src[0] == B and data[0] >> 4 == ST_STATE and self.since is not None
                and trio.current_time() - self.since < self.window):
            self.dropped += 1
            return
        super()._send(src, dst, data)

    armed = False


async def test_retransmitted_tail_after_close_is_acked_not_reset(autojump_clock):
    """TIME_WAIT, issue 10 (found by birthday probing's 5%-loss runs): B
    has sent its FIN, then receives A's last data and FIN, but every ACK of
    them is lost; B's socket is done and goes away.  A retransmits its
    tail, which B already has: the remembered connection ACKs it (all of
    it, FIN included) instead of resetting, so A ends cleanly."""
    async with _DropAcksOfTail(seed=1, delay=0.01) as net, net.endpoint(A, PORT) as a, \
            net.endpoint(B, PORT) as b:
        sa, sb, listener = await _connect_pair(a, b)
        events = []
        sa.on_state_change = events.append
        await sb.send_eof()
        assert await sa.receive_some() == b""   # B's FIN, acknowledged by A
        await trio.sleep(0.5)
        net.armed = True
        await sa.send_all(b"y" * 3000)
        await sa.send_eof()
        got = b""
        while chunk := await sb.receive_some():
            got += chunk
        assert got == b"y" * 3000
        await sb.aclose()
        with trio.fail_after(3.0):
            while b.statistics()["engine"]["sockets_live"]:
                await b.wait_engine_progress()
        await sa.wait_send_complete()
        await trio.sleep(3)
        assert net.dropped >= 1
        assert not [e for e in events if e.startswith("error")], events
        assert b.statistics()["engine"]["resets_sent"] == 0


async def test_endpoint_stays_for_time_wait_so_a_resent_fin_is_acked(autojump_clock):
    """Issue 10, "the close that looks like a reset": A closes first and
    leaves right after B's FIN arrived; A's ACK of that FIN is lost.  The
    Endpoint's exit stays (about two RTOs) to ACK B's resent FIN from TIME_WAIT,
    so B ends cleanly instead of resending its FIN into a closed port."""
    async with SimNetwork(seed=1, delay=0.01) as net:
        async with net.endpoint(B, PORT) as b:
            listener = b.listen()
            a_left: list[float] = []

            async def side_a() -> None:
                async with net.endpoint(A, PORT) as a:
                    s = await a.connect((B, PORT), timeout=10.0)
                    await s.send_all(b"x" * 5000)
                    await s.send_eof()
                    while await s.receive_some():
                        pass
                    await s.aclose()
                a_left.append(trio.current_time())

            async def heal() -> None:
                await trio.sleep(0.3)
                net.set_link(A, B, both=False, up=True)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(side_a)
                sb = await listener.accept()
                got = b""
                while chunk := await sb.receive_some():
                    got += chunk
                assert got == b"x" * 5000
                # A's ACK of B's FIN (and anything else A sends for 0.3 s) is lost.
                net.set_link(A, B, both=False, up=False)
                nursery.start_soon(heal)
                fin_sent = trio.current_time()
                await sb.aclose()
                # B's socket goes away when its FIN is acknowledged (without
                # that ACK it would resend the FIN for much longer).
                with trio.fail_after(5.0):
                    while b.statistics()["engine"]["sockets_live"]:
                        await b.wait_engine_progress()
                acked = trio.current_time()
            # B's FIN was acknowledged only by its retransmission (after
            # the link healed), while A's Endpoint was still there: A left
            # after that, and within the bound (two RTOs, at most 5 s).
            assert acked - fin_sent > 0.3
            assert a_left and acked <= a_left[0] <= fin_sent + 5.0
            assert net.counters["dropped_down"] >= 1
