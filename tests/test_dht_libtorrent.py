"""Interop with a real, independent DHT: libtorrent (PyPI ``libtorrent``)
nodes on loopback, in this process (PEERS.md has the settings).

Our node bootstraps from libtorrent's nodes; libtorrent's dht_get_peers
finds what we announced; our get_peers finds what libtorrent announced.
Without libtorrent the tests fail under CI=true and skip elsewhere.
"""

from __future__ import annotations

import hashlib

import pytest
from testsupport import unavailable
import trio

import dht
import utp

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"


def _lt_session():
    return lt.session({
        "listen_interfaces": "127.0.0.1:0",   # an explicit IP, or its DHT stays off
        "enable_dht": True, "enable_lsd": False, "enable_upnp": False,
        "enable_natpmp": False, "dht_bootstrap_nodes": "",   # never a public host
        "dht_restrict_routing_ips": False, "dht_restrict_search_ips": False,
        "dht_block_ratelimit": 100000,        # every node here shares 127.0.0.1
        "alert_mask": lt.alert_category.dht_operation | lt.alert_category.dht,
    })


@pytest.fixture(scope="module")
def lt_nodes():
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")
    sessions = [_lt_session() for _ in range(3)]
    ports = [s.listen_port() for s in sessions]
    for s in sessions:
        for p in ports:
            s.add_dht_node(("127.0.0.1", p))
    yield sessions, [("127.0.0.1", p) for p in ports]
    for s in sessions:
        s.pause()
    del sessions[:]


async def _lt_get_peers(session, ih, want, timeout=15.0):
    """libtorrent's dht_get_peers until ``want`` shows up in a reply."""
    session.pop_alerts()
    with trio.move_on_after(timeout):
        while True:
            session.dht_get_peers(lt.sha1_hash(ih))
            for _ in range(20):
                await trio.sleep(0.1)
                for a in session.pop_alerts():
                    if isinstance(a, lt.dht_get_peers_reply_alert) and want in a.peers():
                        return True
    return False


async def test_bootstrap_announce_get_peers_with_libtorrent(lt_nodes):
    sessions, addrs = lt_nodes
    async with utp.open_endpoint("127.0.0.1", 0) as ep:
        async with dht.open_node(ep, bootstrap=addrs[:1]) as node:
            # bootstrapped from libtorrent: its other nodes came from it
            with trio.fail_after(20):
                while node.statistics()["nodes"]["ipv4"] < 3:
                    await node.bootstrap(addrs[:1])
                    await trio.sleep(0.5)
            assert {a for _, a in await node.find_node(node.node_id)} >= set(addrs)
            assert await node.ping(addrs[1]) is not None

            # we announce (implied port); libtorrent finds us
            ours = hashlib.sha1(b"utpkit announces").digest()
            res = await node.announce(ours)
            assert res.accepted >= 2, res
            assert await _lt_get_peers(sessions[2], ours, ("127.0.0.1", ep.local_address[1]))

            # libtorrent announces; we find it
            theirs = hashlib.sha1(b"libtorrent announces").digest()
            sessions[0].dht_announce(lt.sha1_hash(theirs), 6543, 0)
            with trio.fail_after(20):
                while True:
                    peers = [p async for p in node.get_peers(theirs)]
                    if ("127.0.0.1", 6543) in peers:
                        break
                    await trio.sleep(0.5)

            # a fresh libtorrent node that knows only us reaches libtorrent's
            # announce through our answers (our stored values or our nodes)
            late = _lt_session()
            try:
                late.add_dht_node(("127.0.0.1", ep.local_address[1]))
                assert await _lt_get_peers(late, theirs, ("127.0.0.1", 6543), timeout=20)
            finally:
                late.pause()
                del late
            st = node.statistics()["counters"]
            assert st.get("malformed", 0) == 0 and st.get("unexpected_response", 0) == 0
