"""The torrent's real peer logic (:class:`bt.peerlogic.PeerLogic`, the code
the trio driver runs) over PeerWire cores, with scripted seeds, on a
virtual clock: a leecher downloads from an honest seed and a bad one (one
that stalls, one that sends corrupt blocks), re-issues timed-out requests,
scores and drops the bad peer, and finishes with every piece verified.
Only storage and verification are the simulation's own (bt.torrent does
them in threads)."""

from __future__ import annotations

import collections
import hashlib
import random

from bt.choker import Choker
from bt.peerlogic import PeerLogic, RateMeter, expire_requests
from bt.peerwire import PeerWire
from bt.picker import PiecePicker
from bt.torrent import PIECE_TIMEOUT
from bt.wire import Cancel, Geometry, Handshake, HaveAll, Interested, Piece, Request, Unchoke

IH = hashlib.sha1(b"core sim").digest()
G = Geometry(total_length=24 * 65536 - 1000, piece_length=65536)      # 24 pieces, 4 blocks
DATA = random.Random(9).randbytes(G.total_length)
HASHES = [hashlib.sha1(DATA[i * G.piece_length:(i + 1) * G.piece_length]).digest()
          for i in range(G.num_pieces)]


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


class SimTorrent:
    """The leecher's torrent: the shared state the peer logic works on, a
    virtual clock, and in place of bt.torrent's threads an in-memory store
    that verifies a piece once its last block is in."""

    def __init__(self, seeds: dict[str, Seed]) -> None:
        self.now = 0.0
        self.picker = PiecePicker(G, random.Random(3))
        self.choker = Choker(random.Random(4), now=0.0)
        self.counters: collections.Counter[str] = collections.Counter()
        self.down = RateMeter()
        self.seeds = seeds
        self.links = {name: SimLink(self, name) for name in seeds}
        self.stored: dict[int, dict[int, bytes]] = {}
        self.strikes: dict[str, int] = {}
        self.banned: set[str] = set()
        for name, link in self.links.items():
            self.choker.add_peer(link, 0.0)
            link.core.send(Handshake.make(IH, b"L" * 20))
            self.transfer(name)
            # as the session does: the peer's handshake first, then ours
            assert isinstance(link.core.next_event(), Handshake)
            link.send_availability()

    @property
    def wants_data(self) -> bool:
        return not self.picker.complete

    def interest_changed(self) -> None:
        """Rechokes a new leecher; this torrent uploads nothing."""

    def transfer(self, name: str) -> bool:
        """Move the bytes queued either way over one link."""
        link, seed = self.links[name], self.seeds[name]
        out = link.core.data_to_send()
        if out:
            seed.core.receive_data(out, self.now)
        seed.step(self.now)
        back = seed.core.data_to_send()
        if back:
            link.core.receive_data(back, self.now)
        return bool(out or back)

    def pump(self) -> None:
        """Run both sides of every link until quiet."""
        for _ in range(50):
            moved = False
            for name in list(self.links):
                moved |= self.transfer(name)
                link = self.links[name]
                blocks, ending = link.drain_events()
                assert ending is None, ending
                self.store(blocks)
            if not moved:
                return

    def store(self, blocks: list) -> None:
        """Keep the blocks, then hash each piece whose blocks are all in
        (the picker counts a block as soon as it is received, so a piece can
        be complete there before its last block of this batch is kept)."""
        for index, begin, data in blocks:
            if not self.picker.has_piece(index):
                self.stored.setdefault(index, {})[begin] = bytes(data)
        for index in dict.fromkeys(index for index, _, _ in blocks):
            if self.picker.has_piece(index) or not self.picker.piece_complete(index):
                continue
            piece = b"".join(v for _, v in sorted(self.stored.pop(index).items()))
            if hashlib.sha1(piece).digest() == HASHES[index]:
                self.picker.piece_passed(index)
                continue
            self.counters["pieces.failed"] += 1
            for sender in self.picker.piece_failed(index):
                self.strikes[sender.name] = self.strikes.get(sender.name, 0) + 1
                if self.strikes[sender.name] >= 2:          # bad data twice: banned
                    self.ban(sender)

    def ban(self, link: "SimLink") -> None:
        self.banned.add(link.name)
        del self.links[link.name]
        self.choker.remove_peer(link)
        self.picker.remove_peer(link)
        link.in_picker = False

    def maintain(self) -> None:
        """bt.torrent's once-a-second upkeep, for the links."""
        expire_requests(self, self.now, PIECE_TIMEOUT)
        for link in list(self.links.values()):
            link.tick(self.now)


class SimLink(PeerLogic):
    """A connection as the driver sees it, on the simulation's clock."""

    def __init__(self, torrent: SimTorrent, name: str) -> None:
        super().__init__(torrent, PeerWire(now=0.0, geometry=G))
        self.sim = torrent
        self.name = name

    def now(self) -> float:
        return self.sim.now

    def close(self, reason: str) -> None:
        raise AssertionError(f"link {self.name} closed: {reason}")


def run(seeds: dict[str, Seed], until: float = 300.0) -> SimTorrent:
    t = SimTorrent(seeds)
    while t.now < until and not t.picker.complete:
        t.pump()
        t.maintain()
        t.pump()
        t.now += 1.0
    return t


def test_stalled_seed_requests_time_out_and_move_to_the_honest_one():
    seeds = {"honest": Seed(), "staller": Seed(serve=3)}
    t = run(seeds)
    assert t.picker.complete, "the download never finished"
    assert t.counters["requests.peer_timed_out"] >= 1
    assert seeds["staller"].cancels >= 1          # its stuck requests were cancelled
    # the honest seed's 4 blocks/s carried nearly all of the 96 blocks,
    # without waiting for the staller's held ones
    assert seeds["staller"].served == 3 and seeds["honest"].served >= 93
    assert t.now <= 96 / 4 + 4, t.now
    assert t.counters["pieces.failed"] == 0


def test_corrupt_seed_is_banned_and_its_pieces_fetched_again():
    seeds = {"honest": Seed(), "liar": Seed(corrupt=True)}
    t = run(seeds)
    assert t.picker.complete
    assert t.banned == {"liar"} and t.counters["pieces.failed"] >= 2
    assert "liar" not in t.links
