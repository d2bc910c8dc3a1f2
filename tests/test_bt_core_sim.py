"""PeerWire cores, the picker and the pipelining helper glued the way the
session driver will glue them, on a virtual clock with in-memory streams:
a leecher downloads from an honest seed and a bad one (one that stalls,
one that sends corrupt blocks), re-issues timed-out requests, scores and
drops the bad peer, and finishes with every piece verified."""

from __future__ import annotations

import hashlib
import random

from bt.peerwire import PeerWire, RequestsDropped
from bt.picker import PiecePicker, request_queue_depth
from bt.wire import (Cancel, Geometry, Handshake, HaveAll, HaveNone, Interested, Piece, Reject,
                     Request, Unchoke)

IH = hashlib.sha1(b"core sim").digest()
G = Geometry(total_length=24 * 65536 - 1000, piece_length=65536)      # 24 pieces, 4 blocks
DATA = random.Random(9).randbytes(G.total_length)
HASHES = [hashlib.sha1(DATA[i * G.piece_length:(i + 1) * G.piece_length]).digest()
          for i in range(G.num_pieces)]
PIECE_TIMEOUT = 20.0       # libtorrent's piece_timeout


class Seed:
    """The seed's side of one connection: serves requests as they come,
    unless it is told to stall (``serve`` = how many to answer) or to lie
    (``corrupt`` = answer with garbage)."""

    def __init__(self, serve: int | None = None, corrupt: bool = False,
                 per_second: int = 4) -> None:
        self.core = PeerWire(now=0.0, geometry=G)
        self.serve = serve
        self.corrupt = corrupt
        self.per_second = per_second          # its upload bandwidth, in blocks
        self.queue: list[Request] = []
        self.second = -1.0
        self.budget = 0
        self.served = 0
        self.cancels = 0

    def step(self, now: float) -> None:
        if now != self.second:
            self.second, self.budget = now, self.per_second
        while (ev := self.core.next_event()) is not None:
            if isinstance(ev, Handshake):
                self.core.send(Handshake.make(ev.infohash, b"S" * 20))
                self.core.send(HaveAll())
            elif isinstance(ev, Interested):
                self.core.send(Unchoke())
            elif isinstance(ev, Cancel):
                self.cancels += 1
                if Request(*ev.key) in self.queue:
                    self.queue.remove(Request(*ev.key))
            elif isinstance(ev, Request):
                self.queue.append(ev)
        while self.queue and self.budget > 0:
            if self.serve is not None and self.served >= self.serve:
                return                                  # hold the rest forever
            ev = self.queue.pop(0)
            self.budget -= 1
            self.served += 1
            start = ev.index * G.piece_length + ev.begin
            block = DATA[start:start + ev.length]
            if self.corrupt:
                block = bytes(b ^ 0xFF for b in block)
            self.core.send(Piece(ev.index, ev.begin, block))


class Leecher:
    """The driver logic the session will have, minus sockets."""

    def __init__(self, seeds: dict[str, Seed]) -> None:
        self.picker = PiecePicker(G, random.Random(3))
        self.conns = {name: PeerWire(now=0.0, geometry=G) for name in seeds}
        self.seeds = seeds
        self.blocks: dict[int, dict[int, bytes]] = {}
        self.snubbed: set[str] = set()
        self.strikes: dict[str, int] = {}
        self.banned: set[str] = set()
        self.timeouts = 0
        self.failed_pieces = 0
        for core in self.conns.values():
            core.send(Handshake.make(IH, b"L" * 20))

    def pump(self, now: float) -> None:
        """Move bytes both ways and run both sides until quiet."""
        for _ in range(50):
            moved = False
            for name, core in list(self.conns.items()):
                seed = self.seeds[name].core
                out = core.data_to_send()
                if out:
                    seed.receive_data(out, now)
                    moved = True
                self.seeds[name].step(now)
                back = seed.data_to_send()
                if back:
                    core.receive_data(back, now)
                    moved = True
                self.handle_events(name, now)
            if not moved:
                return

    def handle_events(self, name: str, now: float) -> None:
        core = self.conns.get(name)
        while core is not None and (ev := core.next_event()) is not None:
            if isinstance(ev, Handshake):
                core.send(HaveNone())
            elif isinstance(ev, HaveAll):
                self.picker.add_peer(name, have_all=True)
                core.send(Interested())
            elif isinstance(ev, Piece):
                self.on_block(name, ev, now)
                core = self.conns.get(name)        # a ban closes it
            elif isinstance(ev, Reject):
                self.picker.cancelled(name, ev.key)
            elif isinstance(ev, RequestsDropped):
                for r in ev.requests:
                    self.picker.cancelled(name, r.key)

    def on_block(self, name: str, ev: Piece, now: float) -> None:
        for other in self.picker.received(name, ev.key, now):
            if other in self.conns:
                self.conns[other].send(Cancel(*ev.key))      # end game
        self.blocks.setdefault(ev.index, {})[ev.begin] = bytes(ev.data)
        if not self.picker.piece_complete(ev.index):
            return
        piece = b"".join(v for _, v in sorted(self.blocks.pop(ev.index).items()))
        if hashlib.sha1(piece).digest() == HASHES[ev.index]:
            self.picker.piece_passed(ev.index)
            return
        self.failed_pieces += 1
        for sender in self.picker.piece_failed(ev.index):
            self.strikes[sender] = self.strikes.get(sender, 0) + 1
            if self.strikes[sender] >= 2:          # bad data twice: banned
                self.ban(sender)

    def ban(self, name: str) -> None:
        self.banned.add(name)
        del self.conns[name]
        self.picker.remove_peer(name)

    def maintain(self, now: float) -> None:
        for name in self.picker.timed_out_peers(now, PIECE_TIMEOUT):
            self.timeouts += 1
            self.snubbed.add(name)
            for blk in self.picker.peer_timed_out(name):
                self.conns[name].send(Cancel(*blk))
        for name, core in self.conns.items():
            if core.peer_choking or not core.am_interested:
                continue
            # 4 blocks/s measured: the minimum queue of 4 blocks
            depth = request_queue_depth(4 * 16384 / 3, 0.05, snubbed=name in self.snubbed,
                                        peer_reqq=core.peer_reqq)
            for blk in self.picker.pick(name, depth - core.outstanding):
                core.send(Request(*blk))
                self.picker.requested(name, blk, now)


def run(seeds: dict[str, Seed], until: float = 300.0) -> tuple[Leecher, float]:
    leecher = Leecher(seeds)
    now = 0.0
    while now < until and not leecher.picker.complete:
        leecher.pump(now)
        leecher.maintain(now)
        leecher.pump(now)
        now += 1.0
    return leecher, now


def test_stalled_seed_requests_time_out_and_move_to_the_honest_one():
    seeds = {"honest": Seed(), "staller": Seed(serve=3)}
    leecher, now = run(seeds)
    assert leecher.picker.complete, "the download never finished"
    assert leecher.timeouts >= 1 and "staller" in leecher.snubbed
    assert seeds["staller"].cancels >= 1          # its stuck requests were cancelled
    # the honest seed's 4 blocks/s carried nearly all of the 96 blocks,
    # without waiting for the staller's held ones
    assert seeds["staller"].served == 3 and seeds["honest"].served >= 93
    assert now <= 96 / 4 + 4
    assert leecher.failed_pieces == 0


def test_corrupt_seed_is_banned_and_its_pieces_fetched_again():
    seeds = {"honest": Seed(), "liar": Seed(corrupt=True)}
    leecher, now = run(seeds)
    assert leecher.picker.complete
    assert leecher.banned == {"liar"} and leecher.failed_pieces >= 2
    assert "liar" not in leecher.conns
