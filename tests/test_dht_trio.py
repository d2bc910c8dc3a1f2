"""The trio driver (dht.open_node) on real Endpoints over utp.simnet, on
trio's virtual clock; and the shared socket: a uTP transfer and DHT traffic
on one Endpoint at the same time."""

from __future__ import annotations

import hashlib
import json
import random
from contextlib import AsyncExitStack

import pytest
import trio

import dht
from utp.simnet import SimNetwork

PORT = 6881


async def _nodes(stack, net, n, **kw):
    eps, nodes = [], []
    for i in range(n):
        ep = await stack.enter_async_context(net.endpoint(f"10.0.0.{i + 1}", PORT))
        boot = [("10.0.0.1", PORT)] if i else []
        node = await stack.enter_async_context(dht.open_node(ep, bootstrap=boot, seed=i, **kw))
        eps.append(ep)
        nodes.append(node)
    return eps, nodes


async def test_announce_get_peers_ping_find_node(autojump_clock):
    async with SimNetwork(seed=1, delay=0.02) as net, AsyncExitStack() as stack:
        eps, nodes = await _nodes(stack, net, 12)
        for node in nodes[1:]:          # a second round so everyone knows everyone
            await node.bootstrap([("10.0.0.1", PORT)])
        ih = hashlib.sha1(b"utpkit").digest()
        res = await nodes[3].announce(ih)                  # implied port
        assert res.accepted >= 6, res
        res = await nodes[4].announce(ih, port=51413)
        assert res.accepted >= 6, res
        search = nodes[9].get_peers(ih)
        peers = [p async for p in search]
        assert sorted(peers) == sorted([("10.0.0.4", PORT), ("10.0.0.5", 51413)])
        assert len(search.nodes) == 8
        assert await nodes[0].ping(("10.0.0.7", PORT)) == nodes[6].node_id
        t0 = trio.current_time()
        assert await nodes[0].ping(("10.0.0.99", PORT)) is None
        assert trio.current_time() - t0 == pytest.approx(3.0)   # 1.5 s, one resend, 1.5 s
        target = nodes[7].node_id
        found = await nodes[2].find_node(target)
        assert found[0] == (target, ("10.0.0.8", PORT))
        stats = nodes[0].statistics()
        assert stats["nodes"]["ipv4"] == 11
        assert stats["counters"]["rx_query_find_node"] > 0
        assert stats["queue"]["received"] > 0 and stats["queue"]["dropped"] == 0
        assert nodes[5].external_address == ("10.0.0.6", PORT)
        assert eps[5].external_address == ("10.0.0.6", PORT)   # the Endpoint's tally, fed by the DHT
        with pytest.raises(ValueError):
            nodes[0].get_peers(b"short")


async def test_state_file_restart_bootstraps_without_bootstrap_nodes(autojump_clock, tmp_path):
    path = str(tmp_path / "dht.json")
    async with SimNetwork(seed=2, delay=0.02) as net, AsyncExitStack() as stack:
        eps, nodes = await _nodes(stack, net, 6)
        async with net.endpoint("10.0.1.1", PORT) as ep:
            async with dht.open_node(ep, bootstrap=[("10.0.0.1", PORT)], state_file=path) as node:
                first_id = node.node_id
                assert node.statistics()["nodes"]["ipv4"] >= 5
                await trio.sleep(601)                  # saved periodically, not only at the end
                assert len(json.loads(open(path).read())["nodes"]) >= 5
        async with net.endpoint("10.0.1.1", PORT) as ep:
            async with dht.open_node(ep, state_file=path) as node:      # no bootstrap
                assert node.node_id == first_id
                await trio.sleep(5)
                assert node.statistics()["nodes"]["ipv4"] >= 5


async def test_shared_socket_utp_transfer_and_dht(autojump_clock):
    async with SimNetwork(seed=3, delay=0.01) as net, AsyncExitStack() as stack:
        eps, nodes = await _nodes(stack, net, 4)
        a, b = eps[1], eps[2]
        listener = b.listen()
        box = {}

        async def accept():
            box["s"] = await listener.accept()

        async with trio.open_nursery() as n:
            n.start_soon(accept)
            s = await a.connect(("10.0.0.3", PORT))
        payload = random.Random(5).randbytes(2_000_000)
        ih = hashlib.sha1(b"shared").digest()
        rx_before = nodes[1].statistics()["queue"]["received"]
        async with trio.open_nursery() as n:
            n.start_soon(s.send_all, payload)

            async def dht_traffic():
                for i in range(5):
                    await nodes[1].announce(ih)
                    await nodes[2].find_node(random.Random(i).randbytes(20))
            n.start_soon(dht_traffic)
            h = hashlib.sha256()
            got = 0
            while got < len(payload):
                chunk = await box["s"].receive_some()
                h.update(chunk)
                got += len(chunk)
        assert h.digest() == hashlib.sha256(payload).digest()
        peers = [p async for p in nodes[3].get_peers(ih)]
        assert peers == [("10.0.0.2", PORT)]       # implied port: the uTP socket's port
        for ep in (a, b):
            st = ep.statistics()
            assert st["owners"]["dht"]["received"] > 10
            assert st["owners"]["dht"]["dropped"] == 0
        assert a.statistics()["engine"]["packets_out"] > 1000
        assert b.statistics()["engine"]["packets_in"] > 1000
        assert nodes[1].statistics()["queue"]["received"] > rx_before


class _VotingEndpoint:
    """An Endpoint with the external-address hook the node feeds."""

    def __init__(self, ep):
        self._ep = ep
        self.votes = []
        self.local_address = ep.local_address

    def datagram_queue(self, *a, **kw):
        return self._ep.datagram_queue(*a, **kw)

    async def sendto(self, data, addr):
        await self._ep.sendto(data, addr)

    def vote_external_address(self, addr, *, reporter, source):
        self.votes.append((addr, reporter, source))


async def test_external_address_votes_reach_the_endpoint_hook(autojump_clock):
    async with SimNetwork(seed=4, delay=0.02) as net, AsyncExitStack() as stack:
        eps, nodes = await _nodes(stack, net, 4)
        async with net.endpoint("10.0.2.1", PORT) as raw:
            ep = _VotingEndpoint(raw)
            async with dht.open_node(ep, bootstrap=[("10.0.0.1", PORT)]) as node:
                await node.find_node(bytes(20))
                assert node.external_address == ("10.0.2.1", PORT)
        assert {v[1] for v in ep.votes} == {"10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"}
        assert {(v[0], v[2]) for v in ep.votes} == {(("10.0.2.1", PORT), "dht")}


async def test_closing_wakes_waiters(autojump_clock):
    async with SimNetwork(seed=6, delay=0.02) as net:
        async with net.endpoint("10.0.0.1", PORT) as ep:
            result = {}
            async with trio.open_nursery() as outer:
                async with dht.open_node(ep) as node:
                    async def pinger():
                        try:
                            await node.ping(("10.0.0.2", PORT))     # nobody there: 3 s
                        except trio.ClosedResourceError:
                            result["ping"] = trio.current_time()
                    outer.start_soon(pinger)
                    await trio.sleep(0.5)
                    closed_at = trio.current_time()
            assert result["ping"] == closed_at
            with pytest.raises(trio.ClosedResourceError):
                await node.announce(bytes(20))
            with pytest.raises(trio.ClosedResourceError):
                node.get_peers(bytes(20))
