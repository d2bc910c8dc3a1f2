"""utp.punch over a simulated network with simulated NATs, on trio's
virtual clock: the exact schedule of SYNs and probes, the tie-break, and
which NAT pairs connect.

The NATs here are a model, not the kernel's (ci/natlab tests those):
``NatNet`` rewrites addresses as a NAT router would and filters inbound
datagrams by kind -- full cone (endpoint-independent mapping and
filtering), port-restricted (endpoint-independent mapping, filtering by the
remote address and port), symmetric (a new public port per destination,
filtering by remote address and port).
"""

from __future__ import annotations


import pytest
from testsupport import exchange
import trio

import utp
from utp._punch import PROBE, is_initiator, tie_break_key
from utp.simnet import SimNetwork

PUB_A, PUB_B = "198.18.0.10", "198.18.0.11"
PRIV_A, PRIV_B = "10.1.0.2", "10.2.0.2"
PORT = 6881
ST_SYN = 4
DELAY = 0.005


class NatNet(SimNetwork):
    """A SimNetwork where some hosts sit behind a NAT of one kind."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.nats = {}      # private host -> (public host, kind)
        self.publics = {}   # public host -> private host
        self.maps = {}      # (private addr, remote addr or None) -> public port
        self.reverse = {}   # (public host, public port) -> private addr
        self.allowed = set()  # (public addr, remote addr) that may come in
        self.next_port = {}
        self.nat_drops = 0

    def add_nat(self, private, public, kind):
        assert kind in ("full", "restricted", "symmetric")
        self.nats[private] = (public, kind)
        self.publics[public] = private
        self.next_port[public] = 40000

    def _send(self, src, dst, data):
        if src[0] in self.nats:
            public, kind = self.nats[src[0]]
            key = (src, dst if kind == "symmetric" else None)
            if key not in self.maps:
                if kind == "symmetric":
                    port = self.next_port[public]
                    self.next_port[public] += 1
                else:
                    port = src[1]  # port preserving, like Linux without random
                self.maps[key] = port
                self.reverse[(public, port)] = src
            src = (public, self.maps[key])
            self.allowed.add((src, dst))
        if dst[0] in self.publics:
            public = dst[0]
            private = self.reverse.get(dst)
            _, kind = self.nats[self.publics[public]]
            if private is None or (kind != "full" and (dst, src) not in self.allowed):
                self.nat_drops += 1
                if self.trace is not None:  # sent, though it dies here
                    self.trace.append((trio.current_time(), src, dst, data))
                return
            dst = private
        super()._send(src, dst, data)


def _syns(net, src_host):
    return [t for t, s, d, data in net.trace if s[0] == src_host and data[0] >> 4 == ST_SYN
            and (data[0] & 0x0F) == 1]


def _probes(net, src_host):
    return [t for t, s, d, data in net.trace if s[0] == src_host and data == PROBE]


async def _both(ep_a, pub_a, ep_b, pub_b, *, b_delay=0.0, **kw):
    """punch from both sides; returns (stream_a, stream_b) or the errors."""
    out = {}

    async def side(name, ep, mine, theirs, wait):
        await trio.sleep(wait)
        try:
            out[name] = await utp.punch(ep, theirs, local_public=mine, **kw)
        except Exception as exc:  # noqa: BLE001 - the test looks at it
            out[name] = exc

    async with trio.open_nursery() as n:
        n.start_soon(side, "a", ep_a, pub_a, pub_b, 0.0)
        n.start_soon(side, "b", ep_b, pub_b, pub_a, b_delay)
    return out["a"], out["b"]


async def _exchange(sa, sb):
    await exchange(sa, sb, 200_000)


# ---- tie-break ---------------------------------------------------------------------


def test_tie_break_is_antisymmetric_and_family_blind():
    a, b = ("198.18.0.10", 5000), ("198.18.0.11", 4000)
    assert is_initiator(a, b) and not is_initiator(b, a)
    # The same IP: the port decides.
    assert is_initiator(("1.2.3.4", 1), ("1.2.3.4", 2))
    # A dual-stack socket spells IPv4 as IPv4-mapped IPv6: same key.
    assert tie_break_key(("::ffff:198.18.0.10", 5000, 0, 0)) == tie_break_key(a)
    with pytest.raises(ValueError, match="our own public endpoint"):
        is_initiator(a, ("::ffff:198.18.0.10", 5000))


def test_probe_is_neither_utp_nor_dht_nor_tracker():
    # The demultiplexer hands probes to the "other" owner; an Endpoint that
    # is not punching counts and drops them.
    assert utp.classify(PROBE) == utp.UTPKIT_CLASS_OTHER


async def test_stray_probes_are_dropped_by_an_endpoint_not_punching(autojump_clock):
    async with NatNet(seed=11, delay=DELAY) as net, net.endpoint(PUB_A, PORT) as a, \
            net.endpoint(PUB_B, PORT) as b:
        await a.sendto(PROBE, (PUB_B, PORT))
        await trio.sleep(0.1)
        assert b.statistics()["owners"]["other"]["unowned_dropped"] == 1


async def test_no_nat_one_syn_connects_and_lower_endpoint_initiates(autojump_clock):
    async with NatNet(seed=1, trace=True, delay=DELAY) as net, \
            net.endpoint(PUB_A, PORT) as a, net.endpoint(PUB_B, PORT) as b:
        t0 = trio.current_time()
        sa, sb = await _both(a, (PUB_A, PORT), b, (PUB_B, PORT), timeout=10)
        assert isinstance(sa, utp.UTPStream) and isinstance(sb, utp.UTPStream)
        # A is lower: A sends exactly one SYN, at once; B sends none and
        # one probe at once; the SYN-ACK is back after one round trip.
        assert [t - t0 for t in _syns(net, PUB_A)] == [0.0]
        assert _syns(net, PUB_B) == []
        assert [t - t0 for t in _probes(net, PUB_B)] == [0.0]
        assert _probes(net, PUB_A) == []
        assert sa.peer_address == (PUB_B, PORT) and sb.peer_address == (PUB_A, PORT)
        await _exchange(sa, sb)
        await _exchange(sb, sa)
        # The punch's probe queue and claim are gone again; it never
        # opened the Endpoint's listener.
        assert "other" not in a.statistics()["owners"]
        assert b.statistics().get("claims", []) == [] and b.listener is None


async def test_tie_break_swaps_roles(autojump_clock):
    # B's public endpoint sorts lower here (the address first, then the
    # port), so B sends the SYNs.
    high = "198.18.0.20"
    async with NatNet(seed=2, trace=True, delay=DELAY) as net, \
            net.endpoint(high, 1000) as a, net.endpoint(PUB_B, 7000) as b:
        sa, sb = await _both(a, (high, 1000), b, (PUB_B, 7000), timeout=10)
        assert isinstance(sa, utp.UTPStream) and isinstance(sb, utp.UTPStream)
        assert _syns(net, high) == [] and len(_syns(net, PUB_B)) == 1
        assert len(_probes(net, high)) == 1 and _probes(net, PUB_B) == []
        await _exchange(sb, sa)


async def test_restricted_both_sides_exact_schedule_with_late_responder(autojump_clock):
    # B starts 0.35 s late: A's SYNs at 0, 0.1, 0.2, 0.3 die at B's NAT;
    # B's first probe (0.35) opens B's NAT towards A; A's SYN at 0.4 passes.
    async with NatNet(seed=3, trace=True, delay=DELAY) as net:
        net.add_nat(PRIV_A, PUB_A, "restricted")
        net.add_nat(PRIV_B, PUB_B, "restricted")
        async with net.endpoint(PRIV_A, PORT) as a, net.endpoint(PRIV_B, PORT) as b:
            t0 = trio.current_time()
            sa, sb = await _both(a, (PUB_A, PORT), b, (PUB_B, PORT), b_delay=0.35,
                                 timeout=10, interval=0.1)
            assert isinstance(sa, utp.UTPStream), sa
            assert isinstance(sb, utp.UTPStream), sb
            syns = [round(t - t0, 6) for t in _syns(net, PUB_A)]
            assert syns == [0.0, 0.1, 0.2, 0.3, 0.4]
            assert [round(t - t0, 6) for t in _probes(net, PUB_B)] == [0.35]
            # Five attempts, one connection: the four dead ones were closed.
            assert sb.peer_address == (PUB_A, PORT)
            await _exchange(sa, sb)
            await _exchange(sb, sa)


async def test_long_rtt_several_syns_arrive_exactly_one_connection(autojump_clock):
    # A 0.6 s round trip: SYNs paced 0.1 s apart pile up at B before the
    # first SYN-ACK is back.  B accepts the first and refuses the rest.
    async with NatNet(seed=4, trace=True, delay=0.3) as net:
        net.add_nat(PRIV_A, PUB_A, "restricted")
        net.add_nat(PRIV_B, PUB_B, "restricted")
        async with net.endpoint(PRIV_A, PORT) as a, net.endpoint(PRIV_B, PORT) as b:
            sa, sb = await _both(a, (PUB_A, PORT), b, (PUB_B, PORT), timeout=10)
            assert isinstance(sa, utp.UTPStream), sa
            assert isinstance(sb, utp.UTPStream), sb
            assert len(_syns(net, PUB_A)) >= 5
            # B's engine admitted exactly one SYN (the punch's firewall,
            # asked before any SYN-ACK) and refused the later ones.
            eng = b.statistics()["engine"]
            assert eng["firewall_calls"] - eng["firewall_refused"] == 1
            assert eng["syn_refused"] >= 1 and b.listener is None
            # The later SYNs were refused (RESET), once the punch had its one.
            resets = [d for _, s, _, d in net.trace if s[0] == PUB_B and d[0] >> 4 == 3]
            assert resets
            assert a.statistics()["connections"] == 1
            await _exchange(sa, sb)
            await _exchange(sb, sa)
            assert a.statistics()["connections"] == 1 and b.statistics()["connections"] == 1


@pytest.mark.parametrize("kind_a, kind_b", [
    ("symmetric", "full"), ("full", "symmetric"),
    ("full", "full"), ("full", "restricted"), ("restricted", "full"),
])
async def test_punchable_pairs(autojump_clock, kind_a, kind_b):
    async with NatNet(seed=5, trace=True, delay=DELAY) as net:
        net.add_nat(PRIV_A, PUB_A, kind_a)
        net.add_nat(PRIV_B, PUB_B, kind_b)
        async with net.endpoint(PRIV_A, PORT) as a, net.endpoint(PRIV_B, PORT) as b:
            # The rendezvous saw each side through its mapping towards a
            # tracker (for a symmetric NAT: a port the peer never sees).
            pub_a = (PUB_A, 40000 if kind_a == "symmetric" else PORT)
            pub_b = (PUB_B, 40000 if kind_b == "symmetric" else PORT)
            if kind_a == "symmetric":
                await a.sendto(b"x" * 20, ("198.18.0.2", 6969))
            if kind_b == "symmetric":
                await b.sendto(b"x" * 20, ("198.18.0.2", 6969))
            sa, sb = await _both(a, pub_a, b, pub_b, timeout=10)
            assert isinstance(sa, utp.UTPStream), sa
            assert isinstance(sb, utp.UTPStream), sb
            await _exchange(sa, sb)
            await _exchange(sb, sa)


@pytest.mark.parametrize("kind_a, kind_b", [
    ("symmetric", "restricted"), ("restricted", "symmetric"), ("symmetric", "symmetric"),
])
async def test_impossible_pairs_time_out_naming_what_was_tried(autojump_clock, kind_a, kind_b):
    async with NatNet(seed=6, trace=True, delay=DELAY) as net:
        net.add_nat(PRIV_A, PUB_A, kind_a)
        net.add_nat(PRIV_B, PUB_B, kind_b)
        async with net.endpoint(PRIV_A, PORT) as a, net.endpoint(PRIV_B, PORT) as b:
            t0 = trio.current_time()
            sa, sb = await _both(a, (PUB_A, 39999), b, (PUB_B, 39999), timeout=8)
            assert trio.current_time() - t0 == pytest.approx(8, abs=0.01)
            assert isinstance(sa, TimeoutError) and isinstance(sb, TimeoutError)
            assert "as the initiator sent" in str(sa) and "connection attempts" in str(sa)
            assert "as the responder sent" in str(sb) and "probes" in str(sb)
            assert a.statistics()["connections"] == 0 and b.statistics()["connections"] == 0


async def test_waiting_alone_paces_probes_then_keeps_the_mapping_alive(autojump_clock):
    async with NatNet(seed=7, trace=True, delay=DELAY) as net, \
            net.endpoint(PUB_B, PORT) as b:
        t0 = trio.current_time()
        with pytest.raises(TimeoutError, match=r"responder sent 53 probes"):
            await utp.punch(b, (PUB_A, PORT), local_public=(PUB_B, PORT), timeout=60)
        times = [t - t0 for t in _probes(net, PUB_B)]
        fast = [t for t in times if t < 5.0 - 1e-9]
        assert len(fast) == 50
        assert all(b - a == pytest.approx(0.1) for a, b in zip(fast, fast[1:]))
        slow = times[50:]
        assert slow == pytest.approx([5.0, 25.0, 45.0], abs=1e-6)
        # And again: the punch left nothing registered behind.
        with pytest.raises(TimeoutError):
            await utp.punch(b, (PUB_A, PORT), local_public=(PUB_B, PORT), timeout=1)


async def test_initiator_alone_reports_attempts(autojump_clock):
    async with NatNet(seed=8, delay=DELAY) as net, net.endpoint(PUB_A, PORT) as a:
        with pytest.raises(TimeoutError, match=r"initiator sent 5[01] uTP connection attempts "
                                               r"to 198\.18\.0\.11:6881 .*no probe"):
            await utp.punch(a, (PUB_B, PORT), local_public=(PUB_A, PORT), timeout=5)
        assert a.statistics()["connections"] == 0


async def test_arguments(autojump_clock):
    async with NatNet(seed=9) as net, net.endpoint(PUB_A, PORT) as a:
        with pytest.raises(ValueError, match="timeout or a deadline"):
            await utp.punch(a, (PUB_B, PORT))
        with pytest.raises(ValueError, match="own public endpoint"):
            await utp.punch(a, (PUB_A, PORT), timeout=1)
        with pytest.raises(ValueError, match="keepalive"):
            await utp.punch(a, (PUB_B, PORT), timeout=1, keepalive=30)
        async with net.endpoint("0.0.0.0", PORT) as wild:
            with pytest.raises(ValueError, match="needs local_public"):
                await utp.punch(wild, (PUB_B, PORT), timeout=1)
        a.listen()
        with pytest.raises(TimeoutError, match="as the responder"):
            # We answer here, and may although the Endpoint already listens.
            await utp.punch(a, ("198.18.0.1", PORT), timeout=1)


async def test_cancellation_leaves_nothing(autojump_clock):
    async with NatNet(seed=10, delay=DELAY) as net, net.endpoint(PUB_A, PORT) as a:
        with trio.move_on_after(1.0):
            await utp.punch(a, (PUB_B, PORT), timeout=10)
        await trio.sleep(0.1)
        assert a.statistics()["connections"] == 0
        assert "other" not in a.statistics()["owners"]


async def test_punch_on_a_listening_endpoint_leaves_other_peers_to_the_app(autojump_clock):
    # B answers the punch (its endpoint sorts higher) while its application
    # listens on the same Endpoint: the punch claims A's IP only, and a third
    # host's connection still reaches the application's listener.
    other = "198.18.0.30"
    async with NatNet(seed=12, delay=DELAY) as net, net.endpoint(PUB_A, PORT) as a, \
            net.endpoint(PUB_B, PORT) as b, net.endpoint(other, PORT) as c:
        app = b.listen()
        out = {}

        async def side_b():
            out["b"] = await b.punch((PUB_A, PORT), local_public=(PUB_B, PORT), timeout=10)

        async def third():
            out["c"] = await c.connect((PUB_B, PORT))
            out["app"] = await app.accept()

        async with trio.open_nursery() as n:
            n.start_soon(side_b)
            n.start_soon(third)
            out["a"] = await a.punch((PUB_B, PORT), local_public=(PUB_A, PORT), timeout=10)
        sa, sb = out["a"], out["b"]
        assert sb.peer_address == (PUB_A, PORT) and out["app"].peer_address == (other, PORT)
        await _exchange(sa, sb)
        await out["c"].send_all(b"still the app's")
        assert await out["app"].receive_some() == b"still the app's"
        st = b.statistics()
        assert st["listener"]["accepted"] == 1 and st["listener"]["refused_firewall"] == 0
        assert st.get("claims", []) == [] and b.listener is app
        assert "other" not in st["owners"]  # the punch released its datagram queue
        # After the punch the app gets A's new connections too.
        s2 = await a.connect((PUB_B, PORT))
        assert (await app.accept()).peer_address == (PUB_A, PORT)
        for s in (sa, sb, s2, out["c"]):
            await s.aclose()


@pytest.mark.parametrize("delay", [DELAY, 0.3])
async def test_punch_through_syn_cookies(autojump_clock, delay):
    # Both engines past their half-open bounds (UTPKIT_HALF_OPEN_MAX 0, as
    # under a SYN flood): every SYN is answered with a stateless cookie and
    # the connection exists only once the cookie comes back, so the punch's
    # firewall is asked twice about its connection.  It admits that one SYN
    # (and its cookie) and refuses the initiator's later attempts; with a
    # 0.6 s round trip several SYNs are in flight before the first cookie.
    cookies = {utp.UTPKIT_HALF_OPEN_MAX: 0}
    async with NatNet(seed=14, trace=True, delay=delay) as net:
        net.add_nat(PRIV_A, PUB_A, "restricted")
        net.add_nat(PRIV_B, PUB_B, "restricted")
        async with net.endpoint(PRIV_A, PORT, options=cookies) as a, \
                net.endpoint(PRIV_B, PORT, options=cookies) as b:
            sa, sb = await _both(a, (PUB_A, PORT), b, (PUB_B, PORT), timeout=10)
            assert isinstance(sa, utp.UTPStream), sa
            assert isinstance(sb, utp.UTPStream), sb
            eng = b.statistics()["engine"]   # B answers: its endpoint sorts higher
            assert eng["syn_cookies"] >= 1 and eng["cookie_accepted"] == 1
            assert eng["half_open_peak"] == 0
            assert a.statistics()["connections"] == 1 and b.statistics()["connections"] == 1
            await _exchange(sa, sb)
            await _exchange(sb, sa)
            if delay > DELAY:
                assert len(_syns(net, PUB_A)) >= 3
                assert eng["syn_refused"] >= 1   # the later attempts, before any cookie
