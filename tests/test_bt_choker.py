"""The choker alone (exact decisions on a virtual clock) and the 30-peer
swarm simulation driving the picker and choker together."""

from __future__ import annotations

import collections
import random

import pytest

from bt.choker import Choker
from bt.swarmsim import Swarm


def choker(n=8, now=0.0, **kw):
    c = Choker(random.Random(3), now=now, **kw)
    for p in range(n):
        c.add_peer(p, now)
        c.update(p, peer_interested=True, am_interested=True, now=now)
    return c


def test_tit_for_tat_by_download_rate_while_leeching():
    c = choker()
    for p in range(8):
        c.update(p, download_rate=1000.0 * p, upload_rate=1000.0 * (8 - p))
        c.data_received(p, 0.0)
    d = c.rechoke(0.0, seeding=False)
    assert {4, 5, 6, 7} <= d.unchoked and len(d.unchoked) == 5
    assert d.optimistic not in {4, 5, 6, 7} and d.optimistic is not None
    assert d.to_unchoke == d.unchoked and d.to_choke == frozenset()
    # seeding ranks by what we manage to upload instead
    d = c.rechoke(10.0, seeding=True)
    assert {0, 1, 2, 3} <= d.unchoked
    assert d.to_choke >= {4, 5, 6, 7} - {d.optimistic}


def test_uninterested_peers_get_no_slot():
    c = choker(n=3)
    c.update(1, peer_interested=False)
    d = c.rechoke(0.0, seeding=True)
    assert d.unchoked == {0, 2} and d.optimistic is None


def test_rechoke_timer_and_optimistic_rotation_every_30s():
    c = choker(n=10, now=100.0)
    for p in range(10):
        c.update(p, download_rate=float(p))
    opts = []
    for k in range(12):
        now = 100.0 + 10.0 * k
        assert c.get_timer() == now
        assert c.handle_timer(now - 1, seeding=False) is None
        d = c.handle_timer(now, seeding=False)
        for p in range(10):
            c.data_received(p, now)
        opts.append(d.optimistic)
    # changes exactly at every third rechoke (30 s), never in between
    for k in range(12):
        if k % 3:
            assert opts[k] == opts[k - 1]
        elif k:
            assert opts[k] != opts[k - 1]
    assert all(o not in {6, 7, 8, 9} for o in opts)


def test_snubbed_peer_loses_its_regular_slot():
    c = choker(n=6)
    for p in range(6):
        c.update(p, download_rate=100.0 * (p + 1))
    assert {2, 3, 4, 5} <= c.rechoke(0.0, seeding=False).unchoked
    for p in range(5):
        c.data_received(p, 59.0)
    assert not c.is_snubbed(5, 59.9) and c.is_snubbed(5, 60.0)
    d = c.rechoke(60.0, seeding=False)
    regular = d.unchoked - {d.optimistic}
    assert 5 not in regular and regular == {1, 2, 3, 4}
    # not interested in it: not snubbing us
    c.update(5, am_interested=False)
    assert not c.is_snubbed(5, 200.0)


def test_new_peers_are_three_times_likelier_optimistic_picks():
    counts = collections.Counter()
    for trial in range(600):
        c = Choker(random.Random(trial), slots=0, now=1000.0)
        for p in range(4):
            c.add_peer(p, 0.0 if p < 3 else 990.0)     # 3 is new
            c.update(p, peer_interested=True)
        counts[c.rechoke(1000.0, seeding=True).optimistic] += 1
    # expected shares: new 3/6 = 50 %, each old one 1/6
    assert 0.42 < counts[3] / 600 < 0.58
    assert all(0.10 < counts[p] / 600 < 0.23 for p in range(3))


# ---- the swarm ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def swarms():
    rarest = Swarm(seed=11)
    rarest.run(600.0)
    randomly = Swarm(seed=11, rarest_first=False)
    randomly.run(600.0)
    return rarest, randomly


def test_swarm_everyone_finishes_and_end_game_does_not_stall(swarms):
    s, _ = swarms
    assert len(s.peers) == 30
    leechers = s.peers[1:]
    assert all(p.finished_at is not None for p in leechers), "a leecher never finished"
    for p in leechers:
        assert p.endgame_at is not None
        # the last blocks come in a few seconds, not after a request timeout
        assert p.finished_at - p.endgame_at < 15.0, (p.name, p.endgame_at, p.finished_at)
    total = sum(p.blocks_received for p in leechers)
    assert sum(p.duplicate_blocks for p in leechers) < 0.02 * total


def test_swarm_rarest_first_spreads_copies_faster_than_random(swarms):
    rarest, randomly = swarms
    copies = [c for _, c in rarest.min_copies]
    assert copies == sorted(copies) and copies[-1] == 29
    def full_copy_at(s):
        return next(t for t, c in s.min_copies if c >= 1)
    # the leechers hold a whole copy between them well before with random picks
    assert full_copy_at(rarest) < 0.8 * full_copy_at(randomly)
    # and most of the time, the rarest piece has more copies
    at = {t: c for t, c in randomly.min_copies}
    ahead = sum(1 for t, c in rarest.min_copies if t in at and c > at[t])
    behind = sum(1 for t, c in rarest.min_copies if t in at and c < at[t])
    assert ahead > 2 * behind


def test_swarm_tit_for_tat_rewards_uploaders():
    # Five free riders (no upload) among 24 contributors and one seed:
    # reciprocation leaves them to the optimistic slots and the seed.
    caps = [256 * 1024.0] + [0.0] * 5 + [96 * 1024.0] * 24
    s = Swarm(seed=5, upload_caps=caps, num_pieces=128)   # long enough for 10 s windows
    s.run(900.0)
    riders = [p.finished_at for p in s.peers[1:6]]
    workers = [p.finished_at for p in s.peers[6:]]
    assert all(t is not None for t in workers)
    mean_w = sum(workers) / len(workers)
    assert all(t is None or t > mean_w for t in riders)
    # Leechers' upload slots went to the peers that uploaded to them: per
    # second in the swarm, a free rider held far fewer of them (it gets
    # the optimistic slot and the slots no uploader competes for).
    def share(p):
        return p.unchoked_by_leechers / (p.finished_at or s.now)
    riders_share = sum(share(p) for p in s.peers[1:6]) / 5
    workers_share = sum(share(p) for p in s.peers[6:]) / 24
    assert riders_share < 0.6 * workers_share, (riders_share, workers_share)


def test_swarm_optimistic_unchoke_rotates(swarms):
    s, _ = swarms
    duration = s.now
    for p in s.peers:
        hist = p.choker.optimistic_history
        # one new optimistic peer at least every 30 s (more when one is
        # promoted to a regular slot), each different from the one before
        assert len(hist) >= int(duration // 30.0), (p.name, hist)
        assert all(a != b for (_, a), (_, b) in zip(hist, hist[1:]))
    assert len({peer for p in s.peers for _, peer in p.choker.optimistic_history}) >= 25
