"""A BitTorrent swarm on a virtual clock: the picker and the choker of every
peer driven together, no sockets, seeded, so their swarm-level behaviour
can be tested (rarest first spreads copies, end game finishes, tit-for-tat
rewards uploaders, the optimistic unchoke rotates).

The model is deliberately simple: a full mesh of peers; each has an upload
capacity shared equally among the peers it unchokes that have requests
queued with it (whole 16 KiB blocks, leftover capacity carried over);
requests and Have messages arrive at once; download capacity is unlimited.
A choke discards the requests queued with the choker (BEP 3 without the
Fast Extension).  Rates for the choker are bytes per rechoke window.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from .choker import Choker
from .picker import PiecePicker
from .wire import Geometry

__all__ = ["SimPeer", "Swarm"]


@dataclass(eq=False)
class SimPeer:
    name: int
    upload_cap: float                      # bytes/s
    picker: PiecePicker
    choker: Choker
    seed_from_start: bool
    queues: dict = field(default_factory=dict)      # downloader -> [blocks] it asked us for
    credit: dict = field(default_factory=dict)      # downloader -> bytes of capacity banked
    sent_window: dict = field(default_factory=dict)  # peer -> bytes we sent it this window
    got_window: dict = field(default_factory=dict)   # peer -> bytes it sent us this window
    got_total: dict = field(default_factory=dict)
    interested_in: set = field(default_factory=set)
    finished_at: float | None = None
    endgame_at: float | None = None
    duplicate_blocks: int = 0
    #: seconds this peer spent unchoked by peers that were still leeching
    #: (slots that tit-for-tat hands out, as opposed to seeds' slots)
    unchoked_by_leechers: float = 0.0
    blocks_received: int = 0

    @property
    def seeding(self) -> bool:
        return self.picker.complete


class Swarm:
    """``n`` peers, the first ``seeds`` of them complete.  ``upload_caps``
    gives each peer's capacity (default: seeds 256 KiB/s, leechers spread
    from 32 to 128 KiB/s).  ``rarest_first=False`` picks at random instead,
    the baseline the tests compare against."""

    def __init__(self, *, n: int = 30, seeds: int = 1, num_pieces: int = 64,
                 piece_length: int = 65536, seed: int = 1, tick: float = 0.2,
                 upload_caps: list[float] | None = None, rarest_first: bool = True,
                 queue_depth: int = 8) -> None:
        self.rng = random.Random(seed)
        self.geometry = Geometry(num_pieces * piece_length, piece_length)
        self.tick = tick
        self.now = 0.0
        self.queue_depth = queue_depth
        if upload_caps is None:
            upload_caps = [256 * 1024.0] * seeds + [
                self.rng.uniform(32 * 1024, 128 * 1024) for _ in range(n - seeds)]
        self.peers: list[SimPeer] = []
        for i in range(n):
            is_seed = i < seeds
            picker = PiecePicker(self.geometry, random.Random(self.rng.random()),
                                 have=range(num_pieces) if is_seed else (),
                                 random_first=4 if rarest_first else num_pieces + 1)
            choker = Choker(random.Random(self.rng.random()), now=self.rng.uniform(0, 10))
            self.peers.append(SimPeer(i, upload_caps[i], picker, choker, is_seed))
        for p in self.peers:
            for q in self.peers:
                if p is not q:
                    p.picker.add_peer(q.name, have_all=q.seed_from_start)
                    p.choker.add_peer(q.name, 0.0)
                    p.sent_window[q.name] = p.got_window[q.name] = p.got_total[q.name] = 0
        self.min_copies: list[tuple[float, int]] = []   # (time, rarest piece's holders among leechers)
        self._update_interest()

    # ---- the model --------------------------------------------------------------------

    def _update_interest(self) -> None:
        for p in self.peers:
            for q in self.peers:
                if p is q:
                    continue
                want = not p.seeding and p.picker.interesting(q.name)
                if want != (q.name in p.interested_in):
                    if want:
                        p.interested_in.add(q.name)
                    else:
                        p.interested_in.discard(q.name)
                    q.choker.update(p.name, peer_interested=want)
                    p.choker.update(q.name, am_interested=want, now=self.now)

    def _rechoke(self, p: SimPeer) -> None:
        window = p.choker.rechoke_interval
        for q in self.peers:
            if q is not p:
                p.choker.update(q.name, download_rate=p.got_window[q.name] / window,
                                upload_rate=p.sent_window[q.name] / window)
                p.got_window[q.name] = p.sent_window[q.name] = 0
        decision = p.choker.handle_timer(self.now, seeding=p.seeding)
        if decision is None:
            return
        for d in decision.to_choke:
            downloader = self.peers[d]
            for block in p.queues.pop(d, []):
                downloader.picker.cancelled(p.name, block)
            p.credit.pop(d, None)

    def _request(self, d: SimPeer) -> None:
        if d.seeding:
            return
        for u in self.peers:
            if u is d or d.name not in u.choker.unchoked or u.name not in d.interested_in:
                continue
            q = u.queues.setdefault(d.name, [])
            if len(q) > self.queue_depth // 2:
                continue
            for block in d.picker.pick(u.name, self.queue_depth - len(q)):
                d.picker.requested(u.name, block, self.now)
                q.append(block)

    def _upload(self, u: SimPeer) -> None:
        active = [d for d, q in u.queues.items() if q]
        if not active:
            return
        share = u.upload_cap * self.tick / len(active)
        for d in active:
            credit = u.credit.get(d, 0.0) + share
            q = u.queues[d]
            while q and credit >= q[0][2]:
                block = q.pop(0)
                credit -= block[2]
                self._deliver(u, self.peers[d], block)
            u.credit[d] = credit if q else 0.0

    def _deliver(self, u: SimPeer, d: SimPeer, block: tuple[int, int, int]) -> None:
        u.sent_window[d.name] += block[2]
        d.got_window[u.name] += block[2]
        d.got_total[u.name] += block[2]
        d.choker.data_received(u.name, self.now)
        d.blocks_received += 1
        index = block[0]
        already = d.picker.has_piece(index)
        for other in d.picker.received(u.name, block, self.now):
            # end game: cancel the duplicate request queued elsewhere
            oq = self.peers[other].queues.get(d.name, [])  # type: ignore[call-overload]
            if block in oq:
                oq.remove(block)
        if already:
            d.duplicate_blocks += 1
            return
        if d.picker.piece_complete(index):
            d.picker.piece_passed(index)
            for x in self.peers:
                if x is not d:
                    x.picker.have(d.name, index)
            if d.picker.complete and d.finished_at is None:
                d.finished_at = self.now

    def step(self) -> None:
        self.now += self.tick
        for p in self.peers:
            if p.endgame_at is None and not p.seeding and p.picker.end_game():
                p.endgame_at = self.now
            if self.now >= p.choker.get_timer():
                self._rechoke(p)
            if not p.seeding:
                for d in p.choker.unchoked:
                    self.peers[d].unchoked_by_leechers += self.tick
        for p in self.peers:
            self._request(p)
        for p in self.rng.sample(self.peers, len(self.peers)):
            self._upload(p)
        if round(self.now / self.tick) % round(1.0 / self.tick) == 0:
            self._update_interest()
            self.min_copies.append((self.now, self.leecher_min_copies()))

    def leecher_min_copies(self) -> int:
        """How many leechers (peers that started empty) hold the rarest
        piece: the distributed copies the seed no longer has to supply."""
        leechers = [p for p in self.peers if not p.seed_from_start]
        return min(sum(p.picker.has_piece(i) for p in leechers)
                   for i in range(self.geometry.num_pieces))

    def run(self, until: float) -> None:
        while self.now < until and not all(p.seeding for p in self.peers):
            self.step()
