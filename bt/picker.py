"""The piece picker: which blocks to request from which peer (pure policy).

Shaped like libtorrent's interface, ordered like anacrolix's:

- availability is fed per peer (:meth:`PiecePicker.add_peer` with a bitfield
  or ``have_all``, :meth:`~PiecePicker.have`, :meth:`~PiecePicker.remove_peer`);
  peers are opaque hashable keys;
- :meth:`~PiecePicker.pick` has no side effects: it returns blocks, and the
  caller commits what it did (:meth:`~PiecePicker.requested`,
  :meth:`~PiecePicker.received`, :meth:`~PiecePicker.cancelled`,
  :meth:`~PiecePicker.peer_timed_out`, :meth:`~PiecePicker.piece_passed`,
  :meth:`~PiecePicker.piece_failed`);
- order: priority (higher first; 0 = skip), then pieces this peer is already
  downloading (whole-piece preference: one peer fills one piece, so a hash
  failure names its sender), then other partial pieces (finish what is
  started, so it can be shared), then availability (rarest first), then a
  seeded random tie-break.  Until ``random_first`` pieces are complete,
  availability is ignored (a new peer needs *something* to trade quickly,
  BitTorrent's "random first piece"); sequential mode orders by index
  (streaming).  When every wanted block is requested, end-game mode hands
  out blocks already requested from others, and :meth:`received` names the
  peers whose duplicate requests to cancel.

No clock is read: request timeouts take ``now`` from the caller.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from typing import Hashable, Iterable

from _utpkit.errors import LocalProtocolError

from .wire import BLOCK_SIZE, Bitfield, Geometry

__all__ = ["PiecePicker", "Block", "request_queue_depth", "RANDOM_FIRST",
           "REQUEST_QUEUE_TIME", "MIN_QUEUE", "MAX_QUEUE"]

Peer = Hashable
#: A block is the (index, begin, length) of its request.
Block = tuple[int, int, int]

#: Complete this many pieces in random order before rarest-first (libtorrent
#: uses 4 as well: initial_picker_threshold).
RANDOM_FIRST = 4
#: Keep this many seconds of a peer's download rate in requests (libtorrent's
#: request_queue_time, 3 s): rate x RTT alone is too shallow where the
#: "RTT" a block sees includes the peer's disk and send queue.
REQUEST_QUEUE_TIME = 3.0
MIN_QUEUE = 4
#: libtorrent 2.x's max_out_request_queue, and our own default reqq.
MAX_QUEUE = 500


def request_queue_depth(rate: float, rtt: float, *, snubbed: bool = False,
                        queue_time: float = REQUEST_QUEUE_TIME, min_depth: int = MIN_QUEUE,
                        max_depth: int = MAX_QUEUE, peer_reqq: int | None = None) -> int:
    """How many requests to keep outstanding with a peer that sends
    ``rate`` bytes/s over a path of round-trip ``rtt`` seconds: enough
    blocks to cover rate x max(RTT, queue_time), within [min, max] and the
    peer's advertised ``reqq``.  A snubbed peer gets one (libtorrent does
    the same): it has shown it will not serve more."""
    if snubbed:
        return 1
    depth = math.ceil(rate * max(rtt, queue_time) / BLOCK_SIZE)
    depth = max(min_depth, min(max_depth, depth))
    return min(depth, peer_reqq) if peer_reqq else depth


@dataclass(slots=True)
class _Partial:
    """A piece with blocks requested or received."""
    received: set[int]                  # block numbers
    requesters: dict[int, set]          # block number -> peers asked
    senders: set                        # peers whose blocks we hold


class PiecePicker:
    """See the module docstring.  ``have`` lists pieces we already hold
    (verified)."""

    def __init__(self, geometry: Geometry, rng: random.Random, *,
                 have: Iterable[int] = (), random_first: int = RANDOM_FIRST,
                 sequential: bool = False) -> None:
        self.geometry = geometry
        n = geometry.num_pieces
        self._n = n
        self._avail = [0] * n            # from peers with a bitfield
        self._seeds: set = set()         # peers with every piece (have all)
        self._peer_bits: dict[Peer, bytearray] = {}
        self._have = bytearray(n)
        self._done = 0
        for i in have:
            self._mark_have(i)
        self._priority = [1] * n
        self._order: list[int] | None = None     # cached base order (see _base_order)
        self._order_mode = ""
        self._keys: list[int] = []
        self._tiebreak = list(range(n))
        rng.shuffle(self._tiebreak)
        self._partial: dict[int, _Partial] = {}
        self._peer_pieces: dict[Peer, set[int]] = {}     # pieces a peer has requests in
        self._last_progress: dict[Peer, float] = {}
        self.random_first = random_first
        self.sequential = sequential

    # ---- availability ------------------------------------------------------------------

    def add_peer(self, peer: Peer, bitfield: Bitfield | None = None, *,
                 have_all: bool = False) -> None:
        """A peer connected, with its bitfield (or have-all, or nothing)."""
        if peer in self._peer_bits or peer in self._seeds:
            raise LocalProtocolError(f"peer {peer!r} added twice")
        if have_all:
            self._seeds.add(peer)
            return
        bits = bytearray(self._n)
        if bitfield is not None:
            for i in bitfield.indices():
                if i < self._n:
                    bits[i] = 1
                    self._avail[i] += 1
        self._peer_bits[peer] = bits
        self._order = None

    def have(self, peer: Peer, index: int) -> None:
        """The peer announced a piece (Have)."""
        if peer in self._seeds:
            return
        bits = self._peer_bits[peer]
        if not bits[index]:
            bits[index] = 1
            self._avail[index] += 1
            self._order = None

    def remove_peer(self, peer: Peer) -> list[Block]:
        """The peer disconnected.  Returns the blocks it had outstanding,
        which are pickable again."""
        released = self._release(peer)
        self._seeds.discard(peer)
        bits = self._peer_bits.pop(peer, None)
        if bits is not None:
            for i, b in enumerate(bits):
                if b:
                    self._avail[i] -= 1
            self._order = None
        self._last_progress.pop(peer, None)
        return released

    def availability(self, index: int) -> int:
        return self._avail[index] + len(self._seeds)

    def peer_has(self, peer: Peer, index: int) -> bool:
        return peer in self._seeds or bool(self._peer_bits[peer][index])

    def interesting(self, peer: Peer) -> bool:
        """Whether the peer has a wanted piece we lack (send Interested)."""
        return any(not self._have[i] and self._priority[i] and self.peer_has(peer, i)
                   for i in range(self._n))

    def distributed_copies(self) -> float:
        """libtorrent's measure of swarm health as we see it: the minimum
        availability, plus the fraction of pieces above that minimum."""
        if not self._n:
            return 0.0
        avail = [self.availability(i) + self._have[i] for i in range(self._n)]
        low = min(avail)
        return low + sum(1 for a in avail if a > low) / self._n

    # ---- state ------------------------------------------------------------------------

    @property
    def complete(self) -> bool:
        return all(self._have[i] or not self._priority[i] for i in range(self._n))

    @property
    def num_have(self) -> int:
        return self._done

    def has_piece(self, index: int) -> bool:
        return bool(self._have[index])

    def priority(self, index: int) -> int:
        return self._priority[index]

    def set_priority(self, index: int, priority: int) -> None:
        """0 skips the piece; higher is picked first."""
        if priority < 0:
            raise LocalProtocolError("priority must be >= 0")
        self._priority[index] = priority
        self._order = None

    def end_game(self) -> bool:
        """Every block we still want is requested or received."""
        for i in range(self._n):
            if self._have[i] or not self._priority[i]:
                continue
            p = self._partial.get(i)
            if p is None:
                return False
            for b in range(self.geometry.num_blocks(i)):
                if b not in p.received and not p.requesters.get(b):
                    return False
        return True

    # ---- picking ----------------------------------------------------------------------

    def _base_order(self) -> list[int]:
        """Every piece we lack, best first by (priority, availability,
        tie-break), or (priority, tie-break) in the random phase, or
        (priority, index) in sequential mode.  Cached: sorting is O(n log n)
        in C, but only when availability or priorities changed since the
        last pick.  Pieces we get meanwhile stay in the cached list (a piece
        is never lost again): :meth:`pick` skips them and drops those at the
        front, so a long download does not rescan what it has."""
        mode = ("seq" if self.sequential else
                "random" if self._done < self.random_first else "rarest")
        if self._order is None or self._order_mode != mode:
            n = self._n
            tie = self._tiebreak
            if mode == "seq":
                tie = list(range(n))
            if mode == "rarest":
                scale = (max(self._avail, default=0) + 1) * n
                key = [-p * scale + a * n + t
                       for p, a, t in zip(self._priority, self._avail, tie)]
            else:
                key = [-p * n + t for p, t in zip(self._priority, tie)]
            have = self._have
            self._order = sorted((i for i in range(n) if not have[i]), key=key.__getitem__)
            self._keys = key
            self._order_mode = mode
        return self._order

    def _free_blocks(self, i: int, out: list[Block], count: int) -> None:
        p = self._partial.get(i)
        for b in range(self.geometry.num_blocks(i)):
            if p is not None and (b in p.received or p.requesters.get(b)):
                continue
            out.append(self.geometry.block(i, b).key)
            if len(out) >= count:
                return

    def pick(self, peer: Peer, count: int, *, allowed: Iterable[int] | None = None) -> list[Block]:
        """Up to ``count`` blocks to request from ``peer``, best first.
        ``allowed`` restricts to those pieces (a choked peer's allowed-fast
        set).  Nothing changes until the caller commits with
        :meth:`requested`."""
        if count <= 0:
            return []
        allowed_set = None if allowed is None else set(allowed)
        seed = peer in self._seeds
        bits = None if seed else self._peer_bits[peer]
        have, prio = self._have, self._priority

        def wanted(i: int) -> bool:
            return bool(not have[i] and prio[i] > 0
                        and (seed or bits[i])                      # type: ignore[index]
                        and (allowed_set is None or i in allowed_set))

        order = self._base_order()
        done = 0
        while done < len(order) and have[order[done]]:
            done += 1
        if done:
            del order[:done]
        out: list[Block] = []
        if not self.sequential:
            # Partial pieces first: this peer's own (whole-piece preference),
            # then others' (finish what is started), each in base order.
            keys = self._keys
            mine = self._peer_pieces.get(peer, set())
            started = sorted((i for i in self._partial if wanted(i)),
                             key=lambda i: (-prio[i], i not in mine, keys[i]))
            for i in started:
                self._free_blocks(i, out, count)
                if len(out) >= count:
                    return out
        partial = self._partial
        skip_partial = not self.sequential
        for i in order:
            if have[i] or (skip_partial and i in partial) or not wanted(i):
                continue
            self._free_blocks(i, out, count)
            if len(out) >= count:
                return out
        if out or not self.end_game():
            return out
        # End game: duplicate requests, least-requested blocks first.
        dup = []
        for i, p in self._partial.items():
            if not wanted(i):
                continue
            for b, who in p.requesters.items():
                if b not in p.received and who and peer not in who:
                    dup.append((len(who), self._tiebreak[i], i, b))
        dup.sort()
        return [self.geometry.block(i, b).key for _, _, i, b in dup[:count]]

    # ---- commits ----------------------------------------------------------------------

    def _block_no(self, block: Block) -> tuple[int, int]:
        index, begin, length = block
        if not self.geometry.valid_block(index, begin, length) or begin % BLOCK_SIZE:
            raise LocalProtocolError(f"{block} is not a block of this torrent")
        return index, begin // BLOCK_SIZE

    def requested(self, peer: Peer, block: Block, now: float) -> None:
        """We sent the request."""
        i, b = self._block_no(block)
        p = self._partial.get(i)
        if p is None:
            p = self._partial[i] = _Partial(set(), {}, set())
        p.requesters.setdefault(b, set()).add(peer)
        pieces = self._peer_pieces.setdefault(peer, set())
        if not pieces:
            self._last_progress[peer] = now
        pieces.add(i)

    def received(self, peer: Peer, block: Block, now: float) -> list[Peer]:
        """A block arrived from ``peer``.  Returns the other peers that
        have it requested (end game): send them a Cancel.  A duplicate
        returns [] and changes nothing."""
        i, b = self._block_no(block)
        self._last_progress[peer] = now
        if self._have[i]:
            self._forget(peer, i, b)
            return []
        p = self._partial.get(i)
        if p is None:       # a block that crossed our cancel: still useful
            p = self._partial[i] = _Partial(set(), {}, set())
        if b in p.received:
            self._forget(peer, i, b)
            return []
        p.received.add(b)
        p.senders.add(peer)
        others = [q for q in p.requesters.pop(b, set()) if q != peer]
        self._forget(peer, i, b)
        for q in others:
            self._forget(q, i, b)
        return others

    def cancelled(self, peer: Peer, block: Block) -> None:
        """Our request was cancelled, rejected, or dropped by a choke."""
        i, b = self._block_no(block)
        p = self._partial.get(i)
        if p is not None:
            who = p.requesters.get(b)
            if who:
                who.discard(peer)
                if not who:
                    del p.requesters[b]
            if not p.received and not p.requesters:
                del self._partial[i]
        self._forget(peer, i, b)

    def piece_complete(self, index: int) -> bool:
        """All blocks received: time to hash it."""
        p = self._partial.get(index)
        return p is not None and len(p.received) == self.geometry.num_blocks(index)

    def piece_passed(self, index: int) -> None:
        """The piece's hash checked: we have it."""
        self._partial.pop(index, None)
        self._mark_have(index)

    def piece_failed(self, index: int) -> set:
        """The hash failed: every block is wanted again.  Returns the peers
        that sent blocks of it, for the caller's scoring and bans."""
        p = self._partial.pop(index, None)
        if p is None:
            return set()
        for peer in set().union(*p.requesters.values()) if p.requesters else ():
            self._peer_pieces.get(peer, set()).discard(index)
        return p.senders

    def peer_requests(self, peer: Peer) -> list[Block]:
        out: list[Block] = []
        for i in self._peer_pieces.get(peer, ()):
            p = self._partial[i]
            out.extend(self.geometry.block(i, b).key for b, who in p.requesters.items()
                       if peer in who)
        return out

    def timed_out_peers(self, now: float, timeout: float) -> list[Peer]:
        """Peers with requests outstanding that delivered nothing for
        ``timeout`` seconds (libtorrent's piece_timeout, 20 s): hand their
        blocks to :meth:`peer_timed_out` so others can fetch them."""
        return [peer for peer, pieces in self._peer_pieces.items()
                if pieces and now - self._last_progress.get(peer, now) >= timeout]

    def peer_timed_out(self, peer: Peer) -> list[Block]:
        """Release every request of ``peer``; returns them (send Cancels
        if the connection is kept)."""
        return self._release(peer)

    # ---- internals --------------------------------------------------------------------

    def _mark_have(self, index: int) -> None:
        if not self._have[index]:
            self._have[index] = 1
            self._done += 1

    def _forget(self, peer: Peer, i: int, b: int) -> None:
        """Drop piece ``i`` from the peer's set once it has no request there."""
        pieces = self._peer_pieces.get(peer)
        if not pieces or i not in pieces:
            return
        p = self._partial.get(i)
        if p is None or not any(peer in who for who in p.requesters.values()):
            pieces.discard(i)

    def _release(self, peer: Peer) -> list[Block]:
        blocks = self.peer_requests(peer)
        for block in blocks:
            self.cancelled(peer, block)
        self._peer_pieces.pop(peer, None)
        return blocks
