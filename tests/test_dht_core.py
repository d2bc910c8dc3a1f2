"""The sans-I/O DHT core: bencode, KRPC messages, routing table, tokens, peer
store, votes, and lookups on a simulated 500-node network (virtual clock)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings, strategies as st

from dht import BencodeError, decode_untrusted, encode
from dht._core import DHTCore, ExternalAddressChanged, LookupDone, PeersFound, PingDone
from dht._table import AddressVotes, PeerStore, RoutingTable, TokenManager, load_state, save_state
from dht._wire import (ProtocolError, distance, is_secure_id, pack_addr, parse_untrusted,
                       secure_id, unpack_addr_untrusted, unpack_nodes_untrusted)
from dht.sim import SimDHT

ME = ("10.0.0.1", 6881)
PEER = ("10.0.0.2", 7000)


# ---- bencode -----------------------------------------------------------------------------

def test_bencode_round_trip_and_key_order():
    v = {b"b": [1, -2, b"x"], b"a": {b"z": b"", b"y": 0}}
    data = encode(v)
    assert data == b"d1:ad1:yi0e1:z0:e1:bli1ei-2e1:xee"
    assert decode_untrusted(data) == v


@pytest.mark.parametrize("bad", [
    b"", b"i01e", b"i-0e", b"ie", b"i-e", b"i1", b"01:a", b"2:a", b"l", b"d", b"d1:a",
    b"d1:b0:1:a0:e",          # unsorted keys
    b"d1:a0:1:a0:e",          # duplicate keys
    b"di1ei2ee",              # non-string key
    b"i1ei2e",                # trailing data
    b"x", b"-1:", b"i1.5e", b"i 1e",
    b"l" * 40 + b"e" * 40,    # too deep
])
def test_bencode_rejects(bad):
    with pytest.raises(BencodeError):
        decode_untrusted(bad)


def test_bencode_size_limit():
    with pytest.raises(BencodeError):
        decode_untrusted(b"5000:" + b"x" * 5000, max_size=4096)


_values = st.recursive(
    st.integers(-2**70, 2**70) | st.binary(max_size=40),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.binary(max_size=8), inner, max_size=5),
    max_leaves=20)


@given(_values)
def test_bencode_round_trip_property(v):
    assert decode_untrusted(encode(v)) == v


@given(st.binary(max_size=300))
@settings(max_examples=400)
def test_bencode_garbage_raises_only_bencode_error(data):
    try:
        v = decode_untrusted(data)
    except BencodeError:
        return
    assert encode(v) == data    # accepted input is canonical


# ---- wire ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ip,r,prefix", [
    ("124.31.75.21", 1, "5fbfb"), ("21.75.31.124", 86, "5a3ce"), ("65.23.51.170", 22, "a5d43"),
    ("84.124.73.14", 65, "1b032"), ("43.213.53.83", 90, "e56f6"),
])
def test_bep42_vectors(ip, r, prefix):
    nid = secure_id(ip, bytes(19) + bytes([r]))
    assert nid.hex().startswith(prefix) and nid[19] == r
    assert is_secure_id(nid, ip)
    assert not is_secure_id(bytes(20), ip)
    assert is_secure_id(bytes(20), "127.0.0.1")     # local addresses are exempt


def test_compact_addresses():
    assert unpack_addr_untrusted(pack_addr(("1.2.3.4", 80))) == ("1.2.3.4", 80)
    assert unpack_addr_untrusted(pack_addr(("::1", 443))) == ("::1", 443)
    assert unpack_addr_untrusted(b"12345") is None
    with pytest.raises(ProtocolError):
        unpack_nodes_untrusted(b"x" * 27, 4)


# ---- the message handler -----------------------------------------------------------------

def _node(**kw):
    return DHTCore(rng=random.Random(1), now=0.0, **kw)


def _ask(node, msg, addr=PEER, now=1.0):
    node.receive_datagram(encode(msg), addr, now)
    out = node.datagrams_to_send()
    msgs = [decode_untrusted(d) for d, a in out if a == addr]
    return [m for m in msgs if m[b"y"] != b"q"]     # leave out our verification pings


def _q(method, args, tid=b"aa", **extra):
    a = {b"id": b"P" * 20}
    a.update(args)
    m = {b"t": tid, b"y": b"q", b"q": method, b"a": a}
    m.update(extra)
    return m


def test_ping_response_has_id_ip_and_version():
    n = _node()
    [r] = [m for m in _ask(n, _q(b"ping", {})) if m[b"y"] == b"r"]
    assert r[b"t"] == b"aa" and r[b"r"][b"id"] == n.id
    assert r[b"ip"] == pack_addr(PEER) and r[b"v"][:2] == b"UK"


@pytest.mark.parametrize("msg,code", [
    (_q(b"find_node", {b"target": b"short"}), 203),
    (_q(b"get_peers", {}), 203),
    (_q(b"announce_peer", {b"info_hash": b"I" * 20, b"port": 1, b"token": b"nope"}), 203),
    (_q(b"announce_peer", {b"info_hash": b"I" * 20, b"port": 0, b"token": b"x"}), 203),
    (_q(b"frobnicate", {}), 204),
    ({b"t": b"aa", b"y": b"q", b"q": b"ping", b"a": {b"id": b"short"}}, 203),
    ({b"t": b"aa", b"y": b"x"}, 203),
])
def test_errors_as_bep5(msg, code):
    n = _node()
    [e] = _ask(n, msg)
    assert e[b"y"] == b"e" and e[b"t"] == b"aa" and e[b"e"][0] == code
    assert isinstance(e[b"e"][1], bytes)


def test_garbage_without_tid_is_dropped_and_counted():
    n = _node()
    huge = encode(_q(b"ping", {b"pad": b"x" * 60000}))        # oversized, otherwise valid
    for data in (b"garbage", b"d1:y1:qe", b"de", b"d1:t0:e", huge, b"d" * 5000):
        n.receive_datagram(data, PEER, 1.0)
    assert n.datagrams_to_send() == []
    assert n.counters["malformed"] == 6


def test_announce_with_token_then_get_peers_returns_it():
    n = _node()
    ih = b"I" * 20
    [r] = _ask(n, _q(b"get_peers", {b"info_hash": ih}))
    token = r[b"r"][b"token"]
    assert b"values" not in r[b"r"] and b"nodes" in r[b"r"]
    [ok] = _ask(n, _q(b"announce_peer", {b"info_hash": ih, b"port": 9999, b"token": token,
                                          b"implied_port": 1}, tid=b"bb"))
    assert ok[b"y"] == b"r"
    [r2] = _ask(n, _q(b"get_peers", {b"info_hash": ih}, tid=b"cc"), addr=("10.0.0.3", 1))
    # implied_port: stored under the source port, not the 'port' argument
    assert r2[b"r"][b"values"] == [pack_addr(PEER)]
    # a token is bound to the IP it was given to
    [e] = _ask(n, _q(b"announce_peer", {b"info_hash": ih, b"port": 1, b"token": token}),
               addr=("10.0.0.3", 1))
    assert e[b"e"][0] == 203


def test_tokens_rotate_every_five_minutes():
    tm = TokenManager(random.Random(1), 0.0)
    t = tm.issue("1.2.3.4", 0.0)
    assert tm.check(t, "1.2.3.4", 299.0) and not tm.check(t, "1.2.3.5", 1.0)
    assert tm.check(t, "1.2.3.4", 301.0)        # previous secret still accepted
    assert not tm.check(t, "1.2.3.4", 601.0)    # two rotations later: gone


def test_read_only_node_does_not_answer_and_is_not_added():
    ro = _node(read_only=True)
    assert _ask(ro, _q(b"ping", {})) == []
    n = _node()
    _ask(n, _q(b"ping", {}, ro=1))
    assert n.counters["tx_query_ping"] == 0   # not verified, not added
    _ask(n, _q(b"ping", {}))
    assert n.counters["tx_query_ping"] == 1     # a normal querier is verified by a ping


def test_rate_limit_per_source():
    n = _node(rate=10, burst=20)
    answered = sum(len(_ask(n, _q(b"ping", {}, tid=b"%03d" % i), now=1.0)) for i in range(100))
    assert answered == 20 and n.counters["rate_limited"] == 80
    assert len(_ask(n, _q(b"ping", {}), addr=("10.9.9.9", 1), now=1.0)) == 1   # others unaffected


def test_no_amplification():
    n = _node()
    ih = b"I" * 20
    for i in range(200):
        n.store.add(ih, (f"10.1.{i // 250}.{i % 250 + 1}", 1000 + i), 0.0)
    # fill the table so 'nodes' is full
    for i in range(30):
        n.tables[4].heard_from(random.Random(i).randbytes(20), (f"10.2.0.{i + 1}", 1), 0.0, responded=True)
    req = encode(_q(b"get_peers", {b"info_hash": ih}))
    n.receive_datagram(req, PEER, 1.0)
    [(data, _)] = n.datagrams_to_send()
    assert len(data) <= 4 * len(req)
    assert decode_untrusted(data)[b"r"][b"values"]


def test_unexpected_responses_are_dropped():
    n = _node()
    n.receive_datagram(encode({b"t": b"zz", b"y": b"r", b"r": {b"id": b"X" * 20}}), PEER, 1.0)
    assert n.counters["unexpected_response"] == 1 and n.table_size() == 0
    # a response from another address than the one asked
    rid = n.ping(PEER, 1.0)
    [(q, _)] = n.datagrams_to_send()
    tid = decode_untrusted(q)[b"t"]
    n.receive_datagram(encode({b"t": tid, b"y": b"r", b"r": {b"id": b"X" * 20}}), ("10.6.6.6", 1), 1.1)
    assert n.counters["unexpected_response"] == 2
    n.receive_datagram(encode({b"t": tid, b"y": b"r", b"r": {b"id": b"X" * 20}}), PEER, 1.2)
    ev = n.next_event()
    assert isinstance(ev, PingDone) and ev.node_id == b"X" * 20 and ev.request == rid
    assert n.table_size() == 1


def test_ping_timeout_with_one_retry():
    n = _node()
    n.ping(PEER, 0.0)
    assert len(n.datagrams_to_send()) == 1
    n.handle_timer(n.get_timer())
    assert len(n.datagrams_to_send()) == 1   # the retry
    n.handle_timer(n.get_timer())
    ev = n.next_event()
    assert isinstance(ev, PingDone) and ev.node_id is None


@given(st.binary(max_size=200))
@settings(max_examples=300)
def test_handler_survives_garbage(data):
    n = _node()
    n.receive_datagram(data, PEER, 1.0)
    for out, addr in n.datagrams_to_send():
        assert addr == PEER and len(out) <= max(4 * len(data), 64) + 40


_args = st.dictionaries(st.sampled_from([b"id", b"target", b"info_hash", b"port", b"token",
                                         b"implied_port", b"want", b"x"]),
                        st.one_of(st.binary(max_size=25), st.integers(-5, 70000),
                                  st.lists(st.binary(max_size=3), max_size=3)), max_size=7)


@given(st.sampled_from([b"ping", b"find_node", b"get_peers", b"announce_peer", b"vote"]), _args,
       st.sampled_from([b"q", b"r", b"e"]))
@settings(max_examples=400)
def test_handler_survives_valid_but_absurd(method, args, y):
    n = _node()
    msg = {b"t": b"t1", b"y": y, b"q": method, b"a": args, b"r": args, b"e": [201, b"x"]}
    n.receive_datagram(encode(msg), PEER, 1.0)
    n.datagrams_to_send()
    assert n.table_size() == 0      # nothing gets in without answering our ping


# ---- routing table ------------------------------------------------------------------------

def test_table_splits_only_around_own_id():
    rng = random.Random(3)
    own = rng.randbytes(20)
    t = RoutingTable(own, 4, 0.0)
    for i in range(5000):
        t.heard_from(rng.randbytes(20), (f"10.{i // 65536}.{(i // 256) % 256}.{i % 256}", 1),
                     0.0, responded=True)
    assert all(len(b.nodes) <= 8 for b in t.buckets)
    # every bucket but the last is 'far' (i common prefix bits) and full
    for i, b in enumerate(t.buckets[:-1]):
        for e in b.nodes:
            assert 160 - distance(e.id, own).bit_length() == i
    assert len(t) <= 8 * len(t.buckets) and len(t.buckets) < 20


def test_table_bad_nodes_replaced_from_cache():
    own = bytes(20)
    t = RoutingTable(own, 4, 0.0)
    far = [bytes([0x80 | i]) + bytes(19) for i in range(10)]   # all in bucket 0
    for i, nid in enumerate(far):
        t.heard_from(nid, ("10.0.0.%d" % (i + 1), 1), 0.0, responded=True)
    # the last bucket split until bucket 0 holds the far half
    assert len(t.buckets[0].nodes) == 8 and len(t.buckets[0].replacements) == 2
    victim = t.buckets[0].nodes[0]
    t.failed(victim.id, victim.addr, 1.0)
    assert t.get(victim.id) is not None
    t.failed(victim.id, victim.addr, 2.0)
    assert t.get(victim.id) is None and len(t.buckets[0].nodes) == 8
    assert t.get(far[9]) is not None     # the freshest replacement took its place


def test_node_states():
    t = RoutingTable(bytes(20), 4, 0.0)
    t.heard_from(b"\xff" * 20, ("10.0.0.1", 1), 0.0, responded=True)
    e = t.get(b"\xff" * 20)
    assert e.state(10.0) == "good" and e.state(15 * 60 + 1) == "questionable"
    e.fails = 2
    assert e.state(10.0) == "bad"


def test_state_file_round_trip(tmp_path):
    path = str(tmp_path / "dht.json")
    save_state(path, b"A" * 20, [{"id": ("B" * 20).encode().hex(), "host": "10.0.0.1", "port": 5}])
    assert load_state(path) == (b"A" * 20, [(b"B" * 20, ("10.0.0.1", 5))])
    (tmp_path / "bad.json").write_text("{not json")
    assert load_state(str(tmp_path / "bad.json")) == (None, [])


# ---- peer store, votes --------------------------------------------------------------------

def test_peer_store_bounds_and_expiry():
    s = PeerStore(ttl=100, max_per_hash=10, max_hashes=5, max_total=30)
    rng = random.Random(0)
    for h in range(8):
        for p in range(20):
            s.add(bytes([h]) * 20, ("10.0.0.1", 1000 + p), 0.0)
    assert len(s) <= 30 and s.infohashes <= 5
    assert len(s.get(bytes([7]) * 20, 1.0, 4, 100, rng)) == 10
    s.expire(101.0)
    assert len(s) == 0 and s.infohashes == 0


def test_address_votes():
    v = AddressVotes(quorum=2)
    assert not v.add("1.1.1.1", ("5.5.5.5", 10), 0)
    assert v.add("2.2.2.2", ("5.5.5.5", 10), 0) and v.winner == ("5.5.5.5", 10)
    v.add("3.3.3.3", ("6.6.6.6", 10), 0)
    assert v.winner == ("5.5.5.5", 10)       # one dissenter does not flip it
    v.add("1.1.1.1", ("6.6.6.6", 10), 0)     # a re-vote replaces the reporter's old vote
    assert v.winner == ("6.6.6.6", 10) and v.tally() == {("5.5.5.5", 10): 1, ("6.6.6.6", 10): 2}
    v.add("4.4.4.4", ("5.5.5.5", 10), 0)     # a tie keeps the current winner
    assert v.winner == ("6.6.6.6", 10)


# ---- 500 nodes --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def net500():
    sim = SimDHT(seed=11)
    addrs = sim.build(500, settle=30)
    return sim, addrs


def _truth(sim, target, k=8):
    return sorted((n.id for n in sim.nodes.values()), key=lambda i: distance(i, target))[:k]


def test_lookups_converge_to_true_k_closest(net500):
    sim, addrs = net500
    rng = random.Random(5)
    exact = 0
    for _ in range(40):
        a = rng.choice(addrs)
        target = rng.randbytes(20)
        lid = sim.call(a, lambda n: n.find_node(target, sim.now))
        ev = sim.run_until_done(a, lid)
        assert ev is not None
        got = [nid for nid, _ in ev.nodes]
        truth = _truth(sim, target)
        assert len(set(got) & set(truth)) >= 7
        exact += got == truth
        assert ev.hops <= 6 and ev.queried <= 40
    assert exact >= 38


def test_external_address_learned(net500):
    sim, addrs = net500
    node = sim.nodes[addrs[100]]
    assert node.external_address == addrs[100]
    assert any(isinstance(e, ExternalAddressChanged) for e in sim.events[addrs[100]])


def test_announce_and_get_peers_over_500_nodes(net500):
    sim, addrs = net500
    ih = random.Random(9).randbytes(20)
    a, b = addrs[10], addrs[400]
    lid = sim.call(a, lambda n: n.announce(ih, sim.now))     # implied port
    ev = sim.run_until_done(a, lid)
    assert ev.kind == "announce" and ev.announced >= 6
    lid = sim.call(b, lambda n: n.get_peers(ih, sim.now))
    ev = sim.run_until_done(b, lid)
    peers = [p for e in sim.events[b] if isinstance(e, PeersFound) and e.lookup == lid for p in e.peers]
    assert peers == [a]


def test_churn_20_percent(net500):
    sim, addrs = net500
    rng = random.Random(21)
    ih = rng.randbytes(20)
    pub = addrs[3]
    sim.run_until_done(pub, sim.call(pub, lambda n: n.announce(ih, sim.now, port=4242)))
    gone = set(rng.sample([a for a in addrs if a != pub], len(addrs) // 5))
    for a in gone:
        sim.remove_node(a)
    live = [a for a in addrs if a not in gone]

    def lookups(n, min_overlap, min_exact):
        exact = 0
        for _ in range(n):
            a = rng.choice(live)
            target = rng.randbytes(20)
            ev = sim.run_until_done(a, sim.call(a, lambda n: n.find_node(target, sim.now)))
            assert ev is not None
            got = [nid for nid, _ in ev.nodes]
            assert len(set(got) & set(_truth(sim, target))) >= min_overlap
            exact += got == _truth(sim, target)
        assert exact >= min_exact

    # Right after the churn: dead entries crowd the answers, lookups degrade
    # but still work ...
    lookups(20, 4, 8)
    # ... and once failed queries and bucket refreshes have cleaned the
    # tables (BEP 5's 15 minutes), they are exact again.
    sim.run_for(16 * 60)
    lookups(20, 7, 18)
    # the announce survives on the nodes that are left
    q = rng.choice(live)
    lid = sim.call(q, lambda n: n.get_peers(ih, sim.now))
    sim.run_until_done(q, lid)
    peers = {p for e in sim.events[q] if isinstance(e, PeersFound) and e.lookup == lid for p in e.peers}
    assert (pub[0], 4242) in peers


# ---- BEP 42 in the node; hostile responders ---------------------------------------------

def _answer_query(n, addr, r, now, ip=None):
    """Answer the core's last query to ``addr`` with the 'r' dict ``r``."""
    for data, a in n.datagrams_to_send():
        if a == addr:
            q = decode_untrusted(data)
            msg = {b"t": q[b"t"], b"y": b"r", b"r": r}
            if ip is not None:
                msg[b"ip"] = pack_addr(ip)
            n.receive_datagram(encode(msg), addr, now)


def test_secure_id_adopted_from_votes_and_table_kept():
    n = _node()
    old_id = n.id
    peers = [("10.0.0.%d" % i, 6881) for i in (2, 3, 4)]
    for i, a in enumerate(peers):
        n.ping(a, 1.0)
        _answer_query(n, a, {b"id": bytes([0x80 | i]) * 20}, 1.1, ip=("124.31.75.21", 6881))
    assert n.external_address == ("124.31.75.21", 6881)
    assert n.id != old_id and is_secure_id(n.id, "124.31.75.21")
    assert n.table_size() == 3
    assert n.counters["id_changes"] == 1


def test_bep42_enforcement_keeps_mismatched_ids_out():
    n = _node(enforce_bep42=True)
    bad = ("65.23.51.170", 6881)
    n.ping(bad, 1.0)
    _answer_query(n, bad, {b"id": b"\x00" * 20}, 1.1)
    assert n.table_size() == 0 and n.counters["bep42_rejected"] == 1
    good_id = secure_id("21.75.31.124", random.Random(1).randbytes(20))
    good = ("21.75.31.124", 6881)
    n.ping(good, 1.0)
    _answer_query(n, good, {b"id": good_id}, 1.1)
    assert n.table_size() == 1


def test_lookup_survives_hostile_responder():
    n = _node()
    boot = ("10.0.0.2", 6881)
    n.ping(boot, 0.0)
    _answer_query(n, boot, {b"id": b"H" * 20}, 0.05)
    assert n.table_size() == 1
    lid = n.get_peers(b"T" * 20, 0.1)
    ids = {("10.5.0.%d" % (i + 1), 1): random.Random(i).randbytes(20) for i in range(100)}
    many = b"".join(nid + pack_addr(a) for a, nid in ids.items())
    # 100 nodes, garbage values, a huge token: bounded, not fatal
    for data, a in n.datagrams_to_send():
        q = decode_untrusted(data)
        r = {b"id": b"H" * 20, b"nodes": many, b"token": b"x" * 100,
             b"values": [b"bad", 7, pack_addr(("10.9.9.9", 99))] + [b"z" * 6] * 100}
        n.receive_datagram(encode({b"t": q[b"t"], b"y": b"r", b"r": r}), a, 0.2)
    events = list(iter(n.next_event, None))
    peers = [e for e in events if isinstance(e, PeersFound)]
    assert peers[0].peers == (("10.9.9.9", 99), ("122.122.122.122", 31354))
    assert n.counters["malformed"] == 0
    st = n.statistics()
    assert st["pending_queries"] <= 3          # alpha: 3 of the 16 accepted referrals at a time
    # a nodes string of the wrong length is counted, not fatal
    for data, a in n.datagrams_to_send():
        q = decode_untrusted(data)
        n.receive_datagram(encode({b"t": q[b"t"], b"y": b"r",
                                   b"r": {b"id": ids[a], b"nodes": b"x" * 27}}), a, 0.3)
    assert n.counters["malformed_nodes"] >= 1
    # run it out: the other queries time out, the lookup ends
    t = 0.3
    while n.statistics()["lookups"] and t < 120:
        t = n.get_timer()
        n.handle_timer(t)
        n.datagrams_to_send()
    done = [e for e in iter(n.next_event, None) if isinstance(e, LookupDone)]
    assert done and done[0].lookup == lid and n.statistics()["pending_queries"] == 0


# ---- time: loss, refresh, expiry ---------------------------------------------------------

def test_lookups_under_loss_and_bucket_refresh_and_peer_expiry():
    sim = SimDHT(seed=5, loss=0.05)
    addrs = sim.build(150, settle=20)
    rng = random.Random(8)
    exact = 0
    for _ in range(15):
        a = rng.choice(addrs)
        target = rng.randbytes(20)
        ev = sim.run_until_done(a, sim.call(a, lambda n: n.find_node(target, sim.now)))
        got = [nid for nid, _ in ev.nodes]
        assert len(set(got) & set(_truth(sim, target))) >= 7
        exact += got == _truth(sim, target)
    assert exact >= 12
    assert sum(n.counters["retries"] for n in sim.nodes.values()) > 0
    ih = rng.randbytes(20)
    ev = sim.run_until_done(addrs[0], sim.call(addrs[0], lambda n: n.announce(ih, sim.now, port=7777)))
    assert ev.announced >= 6
    # idle for 31 minutes: buckets are refreshed without user lookups (BEP 5,
    # 15 min), and the announce expires (30 min) since nobody renewed it
    started = {a: sim.nodes[a].counters["lookups_started"] for a in addrs}
    sim.run_for(31 * 60)
    assert all(sim.nodes[a].counters["lookups_started"] > started[a] for a in addrs)
    assert sum(len(n.store) for n in sim.nodes.values()) == 0
    q = addrs[-1]
    lid = sim.call(q, lambda n: n.get_peers(ih, sim.now))
    assert sim.run_until_done(q, lid) is not None
    assert not [e for e in sim.events[q] if isinstance(e, PeersFound) and e.lookup == lid]


# ---- amplification: one budget per query, across families and values ---------------------

def _loaded_node(families, stored, ih):
    n = _node(families=families)
    n.store.max_per_hash = max(n.store.max_per_hash, stored)
    for i in range(stored):
        n.store.add(ih, (f"10.1.{i // 250}.{i % 250 + 1}", 1000 + i), 0.0)
    rng = random.Random(5)
    for i in range(40):     # full tables in every family, so 'nodes'/'nodes6' are long
        n.tables[4].heard_from(rng.randbytes(20), (f"10.2.0.{i + 1}", 1), 0.0, responded=True)
        if 6 in n.tables:
            n.tables[6].heard_from(rng.randbytes(20), (f"2001:db8::{i + 1:x}", 1), 0.0, responded=True)
    return n


@pytest.mark.parametrize("families", [(4,), (4, 6)])
@pytest.mark.parametrize("stored", [0, 1, 250])
@pytest.mark.parametrize("want", [None, [b"n4"], [b"n6"], [b"n4", b"n6"]])
@pytest.mark.parametrize("method", [b"ping", b"find_node", b"get_peers", b"announce_peer"])
def test_no_answer_exceeds_four_times_its_query(families, stored, want, method):
    """Every query type, with 0, 1 and 250 peers stored under the infohash,
    with and without 'want', on an IPv4-only and a dual-stack node: the
    answer (response or error) is at most 4x the query's bytes."""
    ih = b"I" * 20
    n = _loaded_node(families, stored, ih)
    if stored:
        assert len(n.store.get(ih, 1.0, 4, 1000, random.Random(1))) == stored
    args = {b"ping": {}, b"find_node": {b"target": ih}, b"get_peers": {b"info_hash": ih},
            b"announce_peer": {b"info_hash": ih, b"port": 7, b"token": b"tok"}}[method]
    if method == b"announce_peer":
        [r] = _ask(n, _q(b"get_peers", {b"info_hash": ih}, tid=b"zz"))
        args[b"token"] = r[b"r"][b"token"]
    if want is not None:
        args = dict(args, want=want)
    req = encode(_q(method, args))
    n.receive_datagram(req, PEER, 1.0)
    out = [d for d, a in n.datagrams_to_send() if a == PEER and decode_untrusted(d)[b"y"] != b"q"]
    assert len(out) == 1
    ratio = len(out[0]) / len(req)
    assert ratio <= 4, f"{method} answered {len(out[0])} bytes for {len(req)}"
    reply = decode_untrusted(out[0])
    assert reply[b"y"] == b"r"
    if method == b"get_peers" and stored:
        assert reply[b"r"][b"values"]       # peers still come first
    if method == b"find_node" and (want is None or b"n4" in want or 6 in families):
        assert reply[b"r"].get(b"nodes") or reply[b"r"].get(b"nodes6")   # still useful


def test_short_queries_get_no_oversized_error():
    """An error to a tiny query is dropped rather than sent larger than 4x."""
    n = _node()
    req = encode({b"t": b"a" * 40, b"y": b"x"})
    n.receive_datagram(req, PEER, 1.0)
    for data, _ in n.datagrams_to_send():
        assert len(data) <= 4 * len(req)
