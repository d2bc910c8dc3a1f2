"""The piece picker, the pipelining helper and the token bucket: pure
policy, driven with explicit ``now`` and seeded randomness."""

from __future__ import annotations

import random

import pytest

from _utpkit.errors import LocalProtocolError
from bt.picker import PiecePicker, request_queue_depth
from bt.ratelimit import TokenBucket
from bt.wire import BLOCK_SIZE, Bitfield, Geometry

G = Geometry(total_length=20 * 2 * BLOCK_SIZE, piece_length=2 * BLOCK_SIZE)   # 20 pieces, 2 blocks


def bf(indices, n=20):
    return Bitfield.from_indices(indices, n)


def picker(**kw):
    return PiecePicker(G, random.Random(7), **kw)


def test_pick_has_no_side_effects_and_only_offers_what_the_peer_has():
    p = picker()
    p.add_peer("a", bf([3, 5]))
    first = p.pick("a", 10)
    assert sorted(first) == sorted([(3, 0, BLOCK_SIZE), (3, BLOCK_SIZE, BLOCK_SIZE),
                                    (5, 0, BLOCK_SIZE), (5, BLOCK_SIZE, BLOCK_SIZE)])
    assert p.pick("a", 10) == first
    p.add_peer("b")
    assert p.pick("b", 10) == [] and not p.interesting("b")
    p.have("b", 7)
    assert [b[0] for b in p.pick("b", 10)] == [7, 7] and p.interesting("b")


def test_rarest_first_after_random_first_pieces():
    p = picker(have=range(4))                   # the random phase is over
    p.add_peer("s", have_all=True)
    p.add_peer("x", bf(range(10)))
    p.add_peer("y", bf(range(5, 20)))
    # availability: 0-4: 2 (we have 0-3), 5-9: 3, 10-19: 2 -> 4 and 10-19 first
    order = [b[0] for b in p.pick("s", 100)[::2]]
    assert set(order[:11]) == {4} | set(range(10, 20)) and set(order[11:]) == set(range(5, 10))
    assert p.availability(7) == 3 and p.availability(15) == 2


def test_random_first_ignores_availability_and_is_seeded():
    orders = []
    for seed in (1, 2):
        p = PiecePicker(G, random.Random(seed))
        p.add_peer("s", have_all=True)
        p.add_peer("x", bf(range(10)))
        orders.append([b[0] for b in p.pick("s", 40)[::2]])
    # rarest first would put 10-19 first; random first mixes them
    assert any(set(o[:10]) != set(range(10, 20)) for o in orders)
    assert orders[0] != orders[1]
    assert orders[0] == [b[0] for b in _same_seed_pick()[::2]]


def _same_seed_pick():
    p = PiecePicker(G, random.Random(1))
    p.add_peer("s", have_all=True)
    p.add_peer("x", bf(range(10)))
    return p.pick("s", 40)


def test_whole_piece_preference_and_partial_first():
    p = picker(have=range(4))
    for peer in ("a", "b"):
        p.add_peer(peer, have_all=True)
    (blk,) = p.pick("a", 1)
    p.requested("a", blk, 0.0)
    # a continues its own piece; b finishes the partial piece before new ones
    assert p.pick("a", 1)[0][0] == blk[0]
    assert p.pick("b", 1)[0][0] == blk[0]
    p.received("a", blk, 1.0)
    rest = p.pick("a", 1)[0]
    assert rest[0] == blk[0] and rest != blk


def test_commit_cycle_and_piece_failure_reports_senders():
    p = picker(have=range(4))
    p.add_peer("a", have_all=True)
    p.add_peer("b", have_all=True)
    b0, b1 = G.block(9, 0).key, G.block(9, 1).key
    p.requested("a", b0, 0)
    p.requested("b", b1, 0)
    assert p.received("a", b0, 1) == [] and not p.piece_complete(9)
    p.received("b", b1, 1)
    assert p.piece_complete(9)
    assert p.piece_failed(9) == {"a", "b"}
    assert not p.has_piece(9) and sorted(b[0] for b in p.pick("a", 40)).count(9) == 2
    p.requested("a", b0, 2)
    p.requested("a", b1, 2)
    p.received("a", b0, 3)
    p.received("a", b1, 3)
    p.piece_passed(9)
    assert p.has_piece(9) and p.num_have == 5 and all(b[0] != 9 for b in p.pick("b", 40))


def test_cancel_reject_and_disconnect_release_blocks():
    p = picker(have=range(4))
    p.add_peer("a", have_all=True)
    p.add_peer("b", bf([4]))
    blocks = p.pick("a", 4)
    for blk in blocks:
        p.requested("a", blk, 0)
    assert all(blk not in p.pick("b", 10) for blk in blocks)
    p.cancelled("a", blocks[0])
    assert blocks[0] in p.pick("a", 10)
    assert sorted(p.remove_peer("a")) == sorted(blocks[1:])
    assert p.availability(4) == 1 and p.availability(5) == 0
    with pytest.raises(LocalProtocolError):
        p.requested("b", (4, 1, 5), 0)          # not a block boundary


def test_end_game_duplicates_and_reports_cancels():
    p = picker(have=range(19))                     # one piece left: two blocks
    p.add_peer("a", have_all=True)
    p.add_peer("b", have_all=True)
    for blk in p.pick("a", 10):
        p.requested("a", blk, 0)
    assert p.end_game()
    dup = p.pick("b", 10)
    assert sorted(dup) == sorted(G.block(19, i).key for i in range(2))
    for blk in dup:
        p.requested("b", blk, 0)
    assert p.pick("b", 10) == []                    # never twice to the same peer
    assert p.received("b", dup[0], 1) == ["a"]      # cancel a's copy
    assert p.received("a", dup[0], 1) == []         # the crossing duplicate changes nothing
    assert p.received("a", dup[1], 1) == ["b"]
    p.piece_passed(19)
    assert p.complete


def test_sequential_and_priorities():
    p = picker(sequential=True)
    p.add_peer("s", have_all=True)
    assert [b[0] for b in p.pick("s", 8)[::2]] == [0, 1, 2, 3]
    p.set_priority(0, 0)
    p.set_priority(2, 0)
    p.set_priority(17, 5)
    assert [b[0] for b in p.pick("s", 8)[::2]] == [17, 1, 3, 4]
    assert not p.complete
    for i in range(20):
        p.set_priority(i, 0)
    assert p.complete and p.pick("s", 8) == []


def test_request_timeouts_release_blocks_of_a_stalled_peer():
    p = picker(have=range(4))
    p.add_peer("slow", have_all=True)
    p.add_peer("fast", have_all=True)
    mine = p.pick("slow", 3)
    for blk in mine:
        p.requested("slow", blk, 10.0)
    p.received("slow", mine[0], 15.0)
    assert p.timed_out_peers(34.9, 20.0) == []
    assert p.timed_out_peers(35.0, 20.0) == ["slow"]
    assert sorted(p.peer_timed_out("slow")) == sorted(mine[1:])
    assert set(mine[1:]) <= set(p.pick("fast", 10))
    assert p.timed_out_peers(100.0, 20.0) == []


def test_queue_depth_covers_rate_times_rtt():
    # a fast loopback peer: 100 MB/s fills the queue to the maximum
    assert request_queue_depth(100e6, 0.0005) == 500
    assert request_queue_depth(100e6, 0.0005, peer_reqq=250) == 250
    # a long fat path: rate x RTT beyond the queue time
    assert request_queue_depth(1e6, 5.0) == 306
    assert request_queue_depth(0, 0.1) == 4          # the minimum
    assert request_queue_depth(1e6, 0.1) == 184      # 1 MB/s x 3 s / 16 KiB
    assert request_queue_depth(1e6, 0.1, snubbed=True) == 1


def test_token_bucket_holds_the_rate_over_time():
    tb = TokenBucket(100_000, now=0.0)
    granted = 0
    now = 0.0
    while now < 10.0:
        if tb.try_consume(BLOCK_SIZE, now):
            granted += BLOCK_SIZE
        else:
            now += tb.time_until(now)
    # 10 s at 100 kB/s, plus at most the burst and one block of debt
    assert 1_000_000 - BLOCK_SIZE <= granted <= 1_000_000 + tb.burst + BLOCK_SIZE
    assert TokenBucket(None, now=0).try_consume(10**9, 0) and TokenBucket(0, 0).unlimited
    tb.set_rate(None)
    assert tb.time_until(now) == 0.0
    with pytest.raises(LocalProtocolError):
        TokenBucket(-1, now=0)
