"""utp.rendezvous through the DHT (issue 5): on utp.simnet with simulated
NATs (the model of tests/test_punch.py), on trio's virtual clock, with one
public DHT node as the only bootstrap node -- nothing else is contacted.

Each peer announces sha1(key) with implied_port, so the bootstrap node
stores the NAT mapping of the shared socket; each tells itself apart from
the other by the ``ip`` votes of the nodes that answered it, then punches.
"""

from __future__ import annotations


import pytest
from testsupport import exchange
import trio

import dht
import utp
from utp._rendezvous import RendezvousError, _key, split_dht_peers
from utp.simnet import SimNetwork

PUB_A, PUB_B, PUB_DHT = "198.18.0.10", "198.18.0.11", "198.18.0.2"
PRIV_A, PRIV_B = "10.1.0.2", "10.2.0.2"
PORT = 6881
DELAY = 0.005


class NatNet(SimNetwork):
    """A SimNetwork where some hosts sit behind a NAT (full cone,
    port-restricted or symmetric), as in tests/test_punch.py."""

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        self.nats = {}
        self.publics = {}
        self.maps = {}
        self.reverse = {}
        self.allowed = set()
        self.next_port = {}

    def add_nat(self, private, public, kind):
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
                    port = src[1]
                self.maps[key] = port
                self.reverse[(public, port)] = src
            src = (public, self.maps[key])
            self.allowed.add((src, dst))
        if dst[0] in self.publics:
            public = dst[0]
            private = self.reverse.get(dst)
            _, kind = self.nats[self.publics[public]]
            if private is None or (kind != "full" and (dst, src) not in self.allowed):
                return
            dst = private
        super()._send(src, dst, data)


async def _exchange(sa, sb):
    await exchange(sa, sb, 100_000)


async def _meet(net, kind_a, kind_b, *, key="meet-dht", b_delay=0.0, timeout=10.0):
    """Both sides rendezvous via ("dht", [bootstrap]); returns the results
    (streams or exceptions) and the logs."""
    if kind_a != "none":
        net.add_nat(PRIV_A, PUB_A, kind_a)
    if kind_b != "none":
        net.add_nat(PRIV_B, PUB_B, kind_b)
    host_a = PRIV_A if kind_a != "none" else PUB_A
    host_b = PRIV_B if kind_b != "none" else PUB_B
    out, logs = {}, {"a": [], "b": []}
    async with net.endpoint(PUB_DHT, PORT) as boot_ep, \
            dht.open_node(boot_ep, seed=99), \
            net.endpoint(host_a, PORT) as a, net.endpoint(host_b, PORT) as b:

        async def side(name, ep, wait):
            await trio.sleep(wait)
            try:
                out[name] = await utp.rendezvous(ep, key, via=("dht", [(PUB_DHT, PORT)]),
                                                 timeout=timeout, log=logs[name].append)
            except Exception as exc:  # noqa: BLE001 - the test looks at it
                out[name] = exc

        t0 = trio.current_time()
        async with trio.open_nursery() as n:
            n.start_soon(side, "a", a, 0.0)
            n.start_soon(side, "b", b, b_delay)
        elapsed = trio.current_time() - t0
        sa, sb = out["a"], out["b"]
        if isinstance(sa, utp.UTPStream) and isinstance(sb, utp.UTPStream):
            await _exchange(sa, sb)
            await _exchange(sb, sa)
        return sa, sb, logs, elapsed


def test_split_dht_peers():
    ours = {_key(("198.18.0.10", 40000)): None}
    me, others = split_dht_peers([("198.18.0.10", 40000), ("198.18.0.11", 6881),
                                  ("::ffff:198.18.0.12", 5), ("198.18.0.13", 0)], ours)
    assert me == ("198.18.0.10", 40000)
    assert others == [("198.18.0.11", 6881), ("198.18.0.12", 5)]
    assert split_dht_peers([], ours) == (None, [])


@pytest.mark.parametrize("kind_a, kind_b", [
    ("none", "none"), ("restricted", "full"), ("full", "restricted"),
    ("restricted", "restricted"), ("symmetric", "full"), ("none", "symmetric"),
])
async def test_punchable_pairs_meet_through_the_dht(autojump_clock, kind_a, kind_b):
    async with NatNet(seed=3, delay=DELAY) as net:
        sa, sb, logs, elapsed = await _meet(net, kind_a, kind_b, b_delay=0.3)
        assert isinstance(sa, utp.UTPStream), (sa, logs)
        assert isinstance(sb, utp.UTPStream), (sb, logs)
        # Each saw the other at its public address (the NAT mapping the
        # bootstrap node stored through implied_port).
        assert sa.peer_address[0] in (PUB_B, "::ffff:" + PUB_B)
        assert sb.peer_address[0] in (PUB_A, "::ffff:" + PUB_A)
        assert any("implied port" in line and "they see us as 198.18.0.1" in line
                   for line in logs["a"]), logs["a"]
        assert any("punching as the" in line for line in logs["b"]), logs["b"]
        # Found within a couple of polls of B's start.
        assert elapsed < 3.0, (elapsed, logs)


async def test_impossible_pair_times_out_punching(autojump_clock):
    async with NatNet(seed=4, delay=DELAY) as net:
        sa, sb, logs, elapsed = await _meet(net, "symmetric", "restricted", timeout=6)
        assert isinstance(sa, TimeoutError) and isinstance(sb, TimeoutError), (sa, sb)
        assert "hole punching to" in str(sa) and "hole punching to" in str(sb)
        assert elapsed == pytest.approx(6, abs=0.05)


async def test_alone_times_out_naming_the_dht(autojump_clock):
    async with SimNetwork(seed=5, delay=DELAY) as net, \
            net.endpoint(PUB_DHT, PORT) as boot_ep, dht.open_node(boot_ep, seed=1), \
            net.endpoint(PUB_A, PORT) as a:
        t0 = trio.current_time()
        with pytest.raises(TimeoutError, match="no other peer announced the key"):
            await utp.rendezvous(a, "meet-alone", via=("dht", [(PUB_DHT, PORT)]), timeout=4)
        assert trio.current_time() - t0 == pytest.approx(4, abs=0.05)


async def test_no_bootstrap_node_answers(autojump_clock):
    async with SimNetwork(seed=6, delay=DELAY) as net, net.endpoint(PUB_A, PORT) as a:
        with pytest.raises((RendezvousError, TimeoutError)):
            await utp.rendezvous(a, "meet-nobody", via=("dht", [(PUB_DHT, PORT)]), timeout=20)
        with pytest.raises(ValueError):
            await utp.rendezvous(a, "k", via=("dht", []), timeout=1)


async def test_via_an_open_node_on_the_same_endpoint(autojump_clock):
    async with SimNetwork(seed=7, delay=DELAY) as net, \
            net.endpoint(PUB_DHT, PORT) as boot_ep, dht.open_node(boot_ep, seed=1), \
            net.endpoint(PUB_A, PORT) as a, net.endpoint(PUB_B, PORT) as b, \
            dht.open_node(a, bootstrap=[(PUB_DHT, PORT)], seed=2) as node_a, \
            dht.open_node(b, bootstrap=[(PUB_DHT, PORT)], seed=3) as node_b:
        out = {}

        async def side(name, ep, node):
            out[name] = await utp.rendezvous(ep, "meet-node", via=node, timeout=10)

        async with trio.open_nursery() as n:
            n.start_soon(side, "a", a, node_a)
            n.start_soon(side, "b", b, node_b)
        await _exchange(out["a"], out["b"])
        with pytest.raises(ValueError, match="same Endpoint"):
            await utp.rendezvous(a, "meet-node", via=node_b, timeout=1)


async def test_symmetric_nat_seen_at_two_ports_by_two_storing_nodes(autojump_clock):
    # Two full nodes store A, each at the port A's symmetric NAT opened
    # towards it: B gets A twice, A has two addresses voted for it.  The
    # tie-break compares IPs first, and punch accepts by IP and retargets
    # at the probes' source, so either entry works.
    async with NatNet(seed=8, delay=DELAY) as net:
        net.add_nat(PRIV_A, PUB_A, "symmetric")
        boots = [(PUB_DHT, PORT), ("198.18.0.3", PORT)]
        async with net.endpoint(*boots[0]) as e1, net.endpoint(*boots[1]) as e2, \
                dht.open_node(e1, seed=1), dht.open_node(e2, bootstrap=boots[:1], seed=2), \
                net.endpoint(PRIV_A, PORT) as a, net.endpoint(PUB_B, PORT) as b:
            out, logs = {}, {"a": [], "b": []}

            async def side(name, ep):
                out[name] = await utp.rendezvous(ep, "meet-two", via=("dht", boots), timeout=10,
                                                 log=logs[name].append)

            async with trio.open_nursery() as n:
                n.start_soon(side, "a", a)
                n.start_soon(side, "b", b)
            assert any("2 nodes stored us" in line for line in logs["a"]), logs["a"]
            assert len({addr for addr, _ in a._votes._by_reporter.values()}) == 2
            await _exchange(out["a"], out["b"])
            await _exchange(out["b"], out["a"])
