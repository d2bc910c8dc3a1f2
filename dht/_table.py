"""Routing table (BEP 5), tokens, the peer store and external-address votes.

All time is an explicit ``now`` (seconds, any monotonic origin)."""

from __future__ import annotations

import collections
import hashlib
import heapq
import json
import os
import random
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Optional

from _utpkit.contract import StrEnum

from ._wire import ID_LEN, Addr, distance, family_of, pack_addr

__all__ = ["NodeEntry", "NodeState", "RoutingTable", "TokenManager", "PeerStore", "AddressVotes",
           "GOOD_INTERVAL", "REFRESH_INTERVAL"]

K = 8
GOOD_INTERVAL = 15 * 60      # BEP 5: good = responded within the last 15 minutes
REFRESH_INTERVAL = 15 * 60   # BEP 5: buckets unchanged for 15 minutes are refreshed
MAX_FAILS = 2                # consecutive unanswered queries before a node is bad


class NodeState(StrEnum):
    """BEP 5's judgement of a node (equal to the strings it used to be)."""
    GOOD = "good"
    QUESTIONABLE = "questionable"
    BAD = "bad"


_GOOD, _QUESTIONABLE, _BAD = NodeState.GOOD, NodeState.QUESTIONABLE, NodeState.BAD


@dataclass(slots=True)
class NodeEntry:
    id: bytes
    addr: Addr
    first_seen: float
    last_response: float = -1.0     # -1: never answered us
    last_query: float = -1.0        # when it last queried us
    fails: int = 0

    def state(self, now: float) -> NodeState:
        """Good, questionable or bad as BEP 5 defines them."""
        if self.fails >= MAX_FAILS:
            return _BAD
        if self.last_response >= 0 and (now - self.last_response < GOOD_INTERVAL
                                        or now - self.last_query < GOOD_INTERVAL):
            return _GOOD
        return _QUESTIONABLE

    @property
    def last_seen(self) -> float:
        return max(self.last_response, self.last_query)


class Bucket:
    __slots__ = ("nodes", "replacements", "last_changed")

    def __init__(self, now: float) -> None:
        self.nodes: list[NodeEntry] = []
        self.replacements: list[NodeEntry] = []
        self.last_changed = now


class RoutingTable:
    """Buckets of up to ``k`` nodes covering the 160-bit id space.

    Bucket ``i`` (for all but the last) holds nodes whose id shares exactly
    ``i`` leading bits with ours; the last bucket holds everything closer.
    Only the last bucket -- the one whose range contains our own id -- is
    ever split (BEP 5), so the table has at most 160 buckets and
    ``k * 160`` nodes however many ids a peer invents."""

    def __init__(self, own_id: bytes, family: int, now: float, *, k: int = K,
                 replacements: int = K) -> None:
        self.own_id = own_id
        self.own_int = int.from_bytes(own_id, "big")
        self.family = family
        self.k = k
        self.max_replacements = replacements
        self.buckets: list[Bucket] = [Bucket(now)]
        self._by_id: dict[bytes, NodeEntry] = {}
        self._by_addr: dict[Addr, NodeEntry] = {}

    def __len__(self) -> int:
        return len(self._by_id)

    def _bucket_index(self, node_id: bytes) -> int:
        d = self.own_int ^ int.from_bytes(node_id, "big")
        cpl = ID_LEN * 8 - d.bit_length()   # common prefix length (160 for ourselves)
        return min(cpl, len(self.buckets) - 1)

    def bucket_for(self, node_id: bytes) -> Bucket:
        return self.buckets[self._bucket_index(node_id)]

    def get(self, node_id: bytes) -> Optional[NodeEntry]:
        return self._by_id.get(node_id)

    def get_by_addr(self, addr: Addr) -> Optional[NodeEntry]:
        return self._by_addr.get(addr)

    def nodes(self) -> Iterator[NodeEntry]:
        for b in self.buckets:
            yield from b.nodes

    def _split_last(self, now: float) -> None:
        last = self.buckets[-1]
        new = Bucket(now)
        self.buckets.append(new)
        depth = len(self.buckets) - 2   # prefix length the old bucket now covers exactly
        keep: list[NodeEntry] = []
        move: list[NodeEntry] = []
        for e in last.nodes:
            (keep if self._bucket_index(e.id) == depth else move).append(e)
        last.nodes = keep
        new.nodes = move
        rkeep: list[NodeEntry] = []
        rmove: list[NodeEntry] = []
        for e in last.replacements:
            (rkeep if self._bucket_index(e.id) == depth else rmove).append(e)
        last.replacements, new.replacements = rkeep, rmove
        last.last_changed = new.last_changed = now

    def heard_from(self, node_id: bytes, addr: Addr, now: float, *, responded: bool) -> str:
        """Record that ``node_id`` at ``addr`` answered us (``responded``) or
        queried us.  Returns what happened: 'updated', 'added', 'replacement',
        'full' (the bucket is full of good nodes: not kept) or 'rejected'
        (our own id, an id seen at another address, a node at an address
        with another id)."""
        if node_id == self.own_id:
            return "rejected"
        e = self._by_id.get(node_id)
        if e is not None:
            if e.addr != addr:
                # BEP 5 leaves this open; an id that hops between addresses is
                # either spoofed or a NAT rebinding.  Keep the known one until
                # it goes bad.
                return "rejected"
            if responded:
                e.last_response = now
                e.fails = 0
            else:
                e.last_query = now
            return "updated"
        other = self._by_addr.get(addr)
        if other is not None:
            if other.state(now) is not _BAD:
                return "rejected"
            self.remove(other.id)
        if not responded:
            return "unverified" if self.has_room_for(node_id, now) else "full"
        entry = NodeEntry(node_id, addr, now, last_response=now)
        while True:
            idx = self._bucket_index(node_id)
            b = self.buckets[idx]
            if len(b.nodes) < self.k:
                self._insert(b, entry, now)
                return "added"
            for i, old in enumerate(b.nodes):
                if old.state(now) is _BAD:
                    self._drop(old)
                    b.nodes.pop(i)
                    self._insert(b, entry, now)
                    return "added"
            if idx == len(self.buckets) - 1 and len(self.buckets) < ID_LEN * 8:
                self._split_last(now)
                continue
            # Full of good or questionable nodes: keep as a replacement.
            self._add_replacement(b, entry)
            return "replacement"

    def has_room_for(self, node_id: bytes, now: float) -> bool:
        """Would a (verified) node with this id get a place in the table?"""
        idx = self._bucket_index(node_id)
        b = self.buckets[idx]
        return (len(b.nodes) < self.k or idx == len(self.buckets) - 1
                or any(e.state(now) is _BAD for e in b.nodes))

    def _insert(self, b: Bucket, entry: NodeEntry, now: float) -> None:
        b.nodes.append(entry)
        b.last_changed = now
        self._by_id[entry.id] = entry
        self._by_addr[entry.addr] = entry
        b.replacements = [r for r in b.replacements if r.id != entry.id]

    def _drop(self, e: NodeEntry) -> None:
        self._by_id.pop(e.id, None)
        if self._by_addr.get(e.addr) is e:
            del self._by_addr[e.addr]

    def _add_replacement(self, b: Bucket, entry: NodeEntry) -> None:
        b.replacements = [r for r in b.replacements if r.id != entry.id and r.addr != entry.addr]
        b.replacements.append(entry)
        if len(b.replacements) > self.max_replacements:
            del b.replacements[0]

    def failed(self, node_id: bytes, addr: Addr, now: float) -> None:
        """A query to this node went unanswered.  A node that turns bad is
        replaced by the freshest entry of the replacement cache."""
        e = self._by_id.get(node_id)
        if e is None or e.addr != addr:
            return
        e.fails += 1
        if e.fails >= MAX_FAILS:
            b = self.bucket_for(node_id)
            if b.replacements:
                self.remove(node_id)
                self._insert(b, b.replacements.pop(), now)

    def remove(self, node_id: bytes) -> None:
        e = self._by_id.get(node_id)
        if e is None:
            return
        b = self.bucket_for(node_id)
        b.nodes = [x for x in b.nodes if x.id != node_id]
        self._drop(e)

    def questionable_to_ping(self, node_id: bytes, now: float) -> Optional[NodeEntry]:
        """In the (full) bucket where ``node_id`` would go, the least
        recently seen questionable node: pinging it decides whether the
        newcomer gets its place (BEP 5)."""
        b = self.bucket_for(node_id)
        qs = [e for e in b.nodes if e.state(now) is _QUESTIONABLE]
        return min(qs, key=lambda e: e.last_seen) if qs else None

    def closest(self, target: bytes, count: int = K, now: float | None = None) -> list[NodeEntry]:
        """The ``count`` nodes closest to ``target``, bad ones left out."""
        t = int.from_bytes(target, "big")
        cands = (e for e in self._by_id.values() if now is None or e.state(now) is not _BAD)
        return heapq.nsmallest(count, cands, key=lambda e: t ^ int.from_bytes(e.id, "big"))

    def stale_buckets(self, now: float) -> list[int]:
        return [i for i, b in enumerate(self.buckets) if now - b.last_changed >= REFRESH_INTERVAL]

    def random_id_in_bucket(self, index: int, rng: random.Random) -> bytes:
        """A random id that falls in bucket ``index`` (for a refresh lookup)."""
        bits = ID_LEN * 8
        r = rng.getrandbits(bits)
        if index < len(self.buckets) - 1:
            # shares exactly `index` leading bits with us: flip bit `index`
            keep_mask = ((1 << index) - 1) << (bits - index)
            flip = 1 << (bits - index - 1)
            v = (self.own_int & keep_mask) | ((self.own_int ^ flip) & flip) | (r & (flip - 1))
        else:
            keep_mask = ((1 << index) - 1) << (bits - index) if index else 0
            v = (self.own_int & keep_mask) | (r & ~keep_mask & ((1 << bits) - 1))
        return v.to_bytes(ID_LEN, "big")

    def touch_bucket(self, node_id: bytes, now: float) -> None:
        self.bucket_for(node_id).last_changed = now

    # ---- persistence -----------------------------------------------------------------

    def export(self) -> list[dict]:
        return [{"id": e.id.hex(), "host": e.addr[0], "port": e.addr[1]}
                for e in self.nodes() if e.last_response >= 0]


def save_state(path: str, own_id: bytes, nodes: Iterable[dict]) -> None:
    """Write the node id and the known nodes as JSON, atomically."""
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"version": 1, "id": own_id.hex(), "nodes": list(nodes)}, f)
    os.replace(tmp, path)


def load_state(path: str) -> tuple[bytes | None, list[tuple[bytes, Addr]]]:
    """Read what save_state wrote.  A missing or damaged file gives
    ``(None, [])``: a node that cannot read its state starts fresh."""
    try:
        with open(path) as f:
            doc = json.load(f)
        own = bytes.fromhex(doc["id"])
        if len(own) != ID_LEN:
            raise ValueError
        nodes = []
        for n in doc.get("nodes", [])[:2000]:
            nid = bytes.fromhex(n["id"])
            if len(nid) == ID_LEN and isinstance(n["host"], str) and 0 < int(n["port"]) < 65536:
                pack_addr((n["host"], int(n["port"])))   # validates the address
                nodes.append((nid, (n["host"], int(n["port"]))))
        return own, nodes
    except (OSError, ValueError, KeyError, TypeError):
        return None, []


class TokenManager:
    """BEP 5 tokens: a hash of the querier's IP and a secret that changes
    every five minutes; tokens made with the previous secret stay valid, so
    a token lives five to ten minutes."""

    ROTATE = 300.0

    def __init__(self, rng: random.Random, now: float) -> None:
        self.rng = rng
        self.secret = rng.randbytes(16)
        self.previous = rng.randbytes(16)
        self.rotated_at = now

    def _maybe_rotate(self, now: float) -> None:
        if now - self.rotated_at >= self.ROTATE:
            steps = int((now - self.rotated_at) // self.ROTATE)
            self.previous = self.secret if steps == 1 else self.rng.randbytes(16)
            self.secret = self.rng.randbytes(16)
            self.rotated_at += steps * self.ROTATE

    @staticmethod
    def _make(secret: bytes, host: str) -> bytes:
        return hashlib.sha1(secret + host.encode()).digest()[:8]

    def issue(self, host: str, now: float) -> bytes:
        self._maybe_rotate(now)
        return self._make(self.secret, host)

    def check(self, token: bytes, host: str, now: float) -> bool:
        self._maybe_rotate(now)
        return token in (self._make(self.secret, host), self._make(self.previous, host))


class PeerStore:
    """Peers announced to us, per infohash, each expiring ``ttl`` seconds
    after its last announce.  Bounded: at most ``max_per_hash`` peers per
    infohash and ``max_total`` in all (the oldest announce goes first)."""

    def __init__(self, *, ttl: float = 30 * 60, max_per_hash: int = 200,
                 max_hashes: int = 5000, max_total: int = 50000) -> None:
        self.ttl = ttl
        self.max_per_hash = max_per_hash
        self.max_hashes = max_hashes
        self.max_total = max_total
        # infohash -> OrderedDict(compact addr -> expiry), oldest first
        self._peers: collections.OrderedDict[bytes, collections.OrderedDict[bytes, float]] = collections.OrderedDict()
        self.total = 0
        self.evicted = 0

    def add(self, infohash: bytes, addr: Addr, now: float) -> None:
        packed = pack_addr(addr)
        peers = self._peers.get(infohash)
        if peers is None:
            if len(self._peers) >= self.max_hashes:
                self._evict_hash()
            peers = self._peers[infohash] = collections.OrderedDict()
        else:
            self._peers.move_to_end(infohash)
        if packed in peers:
            del peers[packed]
            self.total -= 1
        elif len(peers) >= self.max_per_hash:
            peers.popitem(last=False)
            self.total -= 1
            self.evicted += 1
        peers[packed] = now + self.ttl
        self.total += 1
        while self.total > self.max_total:
            self._evict_hash(oldest_peer_only=True)

    def _evict_hash(self, oldest_peer_only: bool = False) -> None:
        ih, peers = next(iter(self._peers.items()))
        if oldest_peer_only and len(peers) > 1:
            peers.popitem(last=False)
            self.total -= 1
            self.evicted += 1
            return
        del self._peers[ih]
        self.total -= len(peers)
        self.evicted += len(peers)

    def get(self, infohash: bytes, now: float, family: int, limit: int,
            rng: random.Random) -> list[bytes]:
        """Up to ``limit`` live compact addresses of ``family`` (random
        sample when there are more)."""
        peers = self._peers.get(infohash)
        if not peers:
            return []
        size = 6 if family == 4 else 18
        live = [p for p, exp in peers.items() if exp > now and len(p) == size]
        if len(live) > limit:
            live = rng.sample(live, limit)
        return live

    def expire(self, now: float) -> None:
        for ih in list(self._peers):
            peers = self._peers[ih]
            dead = [p for p, exp in peers.items() if exp <= now]
            for p in dead:
                del peers[p]
            self.total -= len(dead)
            if not peers:
                del self._peers[ih]

    def __len__(self) -> int:
        return self.total

    @property
    def infohashes(self) -> int:
        return len(self._peers)


class AddressVotes:
    """What other nodes say our public ``ip:port`` is (BEP 42's ``ip``
    field; BitTorrent's ``yourip`` can feed it too).

    One vote per reporting IP (its latest), votes expire after ``ttl``, at
    most ``max_voters`` reporters are remembered.  The winner is the address
    with most votes, once it has at least ``quorum`` of them; on a tie the
    current winner stays, so one dissenting node cannot flip it."""

    def __init__(self, *, ttl: float = 3600.0, max_voters: int = 64, quorum: int = 2) -> None:
        self.ttl = ttl
        self.max_voters = max_voters
        self.quorum = quorum
        self._votes: collections.OrderedDict[str, tuple[Addr, float]] = collections.OrderedDict()
        self.winner: Addr | None = None

    def add(self, reporter_host: str, reported: Addr, now: float) -> bool:
        """Count a vote; True when the winner changed."""
        self._votes.pop(reporter_host, None)
        self._votes[reporter_host] = (reported, now)
        while len(self._votes) > self.max_voters:
            self._votes.popitem(last=False)
        return self._recount(now)

    def vote_of(self, reporter_host: str) -> Addr | None:
        v = self._votes.get(reporter_host)
        return v[0] if v is not None else None

    def _recount(self, now: float) -> bool:
        for host in [h for h, (_, t) in self._votes.items() if now - t > self.ttl]:
            del self._votes[host]
        tally = collections.Counter(a for a, _ in self._votes.values())
        best: Addr | None = self.winner
        best_n = tally.get(best, 0) if best is not None else 0
        for addr, n in tally.items():
            if n > best_n:
                best, best_n = addr, n
        if best_n < self.quorum:
            best = None if self.winner is None or tally.get(self.winner, 0) == 0 else self.winner
        changed = best != self.winner
        self.winner = best
        return changed

    def tally(self) -> dict[Addr, int]:
        return dict(collections.Counter(a for a, _ in self._votes.values()))
