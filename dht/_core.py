"""The sans-I/O DHT node: datagrams and ``now`` in, datagrams and events out.

Drive it the way aioquic's QuicConnection is driven (STYLE.md)::

    node = DHTCore(rng=random.Random(), now=t)
    node.bootstrap([("10.0.0.1", 6881)], now=t)
    while True:
        for data, addr in node.datagrams_to_send(): sock.sendto(data, addr)
        wait until a datagram arrives or node.get_timer() passes
        node.receive_datagram(data, addr, now)  /  node.handle_timer(now)
        while (ev := node.next_event()) is not None: ...

Nothing here reads a clock, draws unseeded randomness or touches a socket.
"""

from __future__ import annotations

import collections
import random
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

from _utpkit.contract import Event as _CoreEvent
from _utpkit.contract import StrEnum

from _utpkit.bencode import encode
from ._table import (AddressVotes, NodeEntry, PeerStore, RoutingTable, TokenManager, K)
from ._wire import (ERROR_GENERIC, ERROR_METHOD, ERROR_PROTOCOL, ID_LEN, Addr, Error,
                    ProtocolError, Query, Response, build_error, build_query, build_response,
                    exempt_from_bep42, family_of, is_secure_id, pack_addr, pack_nodes,
                    parse_untrusted, secure_id, unpack_addr_untrusted, unpack_nodes_untrusted)

__all__ = ["DHTCore", "Event", "PeersFound", "LookupDone", "PingDone", "ExternalAddressChanged",
           "NodeIdChanged", "AddressReported", "LookupKind", "LookupPhase", "CandidateState",
           "VERSION", "ALPHA"]

VERSION = b"UK\x00\x01"     # client "UK" (utpkit), version 0.1
ALPHA = 3                   # parallel queries per lookup
QUERY_TIMEOUT = 1.5         # seconds per attempt
QUERY_RETRIES = 1           # one resend, then the query has failed
MAINTENANCE_INTERVAL = 5.0
MAX_LOOKUP_CANDIDATES = 256
MAX_LOOKUP_QUERIES = 120
MAX_PENDING = 2048
AMPLIFICATION = 4           # a response is at most this many times its request


# ---- states ------------------------------------------------------------------------------


class LookupKind(StrEnum):
    """What a lookup is for (``LookupDone.kind``); equal to its string
    value, as the field was before it became an Enum."""
    FIND_NODE = "find_node"
    GET_PEERS = "get_peers"
    ANNOUNCE = "announce"
    BOOTSTRAP = "bootstrap"
    REFRESH = "refresh"     # internal: bucket refresh, never reported


class LookupPhase(StrEnum):
    """A lookup searches for the k closest nodes, then (announce lookups)
    sends announce_peer to them, then is done."""
    SEARCH = "search"
    ANNOUNCE = "announce"
    DONE = "done"


class CandidateState(StrEnum):
    """A node a lookup may ask: not yet asked, asked, answered, failed."""
    NEW = "new"
    PENDING = "pending"
    OK = "ok"
    FAILED = "failed"


# Module-level names for the lookup loop's hot comparisons (``is``).
_NEW, _PENDING, _OK, _FAILED = (CandidateState.NEW, CandidateState.PENDING, CandidateState.OK,
                                CandidateState.FAILED)
_FIND_KINDS = (LookupKind.FIND_NODE, LookupKind.BOOTSTRAP, LookupKind.REFRESH)
_PEER_KINDS = (LookupKind.GET_PEERS, LookupKind.ANNOUNCE)


# ---- events -----------------------------------------------------------------------------


class Event(_CoreEvent):
    """Base of the events :meth:`DHTCore.next_event` returns."""

    __slots__ = ()


@dataclass(frozen=True, slots=True)
class PeersFound(Event):
    """New peers from a get_peers or announce lookup (each reported once)."""
    lookup: int
    peers: tuple


@dataclass(frozen=True, slots=True)
class LookupDone(Event):
    """A lookup finished.  ``nodes`` are the k closest nodes that answered,
    closest first, as ``(id, addr)``; ``announced`` is how many of them
    accepted our announce_peer (announce lookups only); ``hops`` is the
    longest referral chain among those nodes."""
    lookup: int
    kind: LookupKind
    target: bytes
    nodes: tuple
    queried: int
    responded: int
    hops: int
    announced: Optional[int] = None
    announce_errors: tuple = ()


@dataclass(frozen=True, slots=True)
class PingDone(Event):
    request: int
    addr: Addr
    node_id: Optional[bytes]    # None: no answer
    rtt: Optional[float]


@dataclass(frozen=True, slots=True)
class ExternalAddressChanged(Event):
    addr: Optional[Addr]


@dataclass(frozen=True, slots=True)
class AddressReported(Event):
    """A node (``reporter``, an IP) told us our address is ``addr`` (BEP 42
    ``ip`` field) -- reported when that node's vote is new or changed, for
    a tally that also counts other sources (the Endpoint's)."""
    reporter: str
    addr: Addr


@dataclass(frozen=True, slots=True)
class NodeIdChanged(Event):
    """We took a BEP 42 id matching our newly learned external IP."""
    node_id: bytes


# ---- internal state -----------------------------------------------------------------------


@dataclass(slots=True)
class _Pending:
    tid: bytes
    addr: Addr
    method: bytes
    data: bytes
    sent_at: float
    deadline: float
    retries: int
    owner: Any          # ("lookup", id) / ("ping", request) / ("verify",) / ("announce", id)
    expect_id: Optional[bytes] = None
    stalled: bool = False


@dataclass(slots=True)
class _Cand:
    id: Optional[bytes]
    addr: Addr
    dist: int
    depth: int
    state: CandidateState = CandidateState.NEW
    token: Optional[bytes] = None


class _Lookup:
    def __init__(self, lid: int, kind: LookupKind, target: bytes, family: int, *, internal: bool,
                 port: Optional[int] = None, implied: bool = False) -> None:
        self.id = lid
        self.kind = kind
        self.target = target
        self.tint = int.from_bytes(target, "big")
        self.family = family
        self.internal = internal
        self.port = port
        self.implied = implied
        self.cands: dict[Addr, _Cand] = {}
        self.seen_ids: set[bytes] = set()
        self.peers: set[bytes] = set()
        self.queried = 0
        self.responded = 0
        self.phase = LookupPhase.SEARCH
        self.announce_pending = 0
        self.announced = 0
        self.announce_errors: list[str] = []
        self.result: tuple = ()
        self.hops = 0

    def add(self, nid: Optional[bytes], addr: Addr, depth: int) -> None:
        if addr in self.cands or (nid is not None and nid in self.seen_ids):
            return
        if nid is not None:
            self.seen_ids.add(nid)
            dist = self.tint ^ int.from_bytes(nid, "big")
        else:
            dist = -1   # a bootstrap address: its id is unknown, ask it first
        self.cands[addr] = _Cand(nid, addr, dist, depth)
        if len(self.cands) > MAX_LOOKUP_CANDIDATES:
            # Forget the farthest candidate nobody is waiting on.
            far = max((c for c in self.cands.values() if c.state is _NEW or c.state is _FAILED),
                      key=lambda c: c.dist, default=None)
            if far is not None:
                del self.cands[far.addr]


class _RateLimiter:
    """A token bucket per source IP, for at most ``max_sources`` IPs (least
    recently seen forgotten first)."""

    def __init__(self, rate: float, burst: float, max_sources: int = 4096) -> None:
        self.rate = rate
        self.burst = burst
        self.max_sources = max_sources
        self._b: collections.OrderedDict[str, list[float]] = collections.OrderedDict()

    def allow(self, host: str, now: float) -> bool:
        b = self._b.pop(host, None)
        if b is None:
            b = [self.burst, now]
        else:
            b[0] = min(self.burst, b[0] + (now - b[1]) * self.rate)
            b[1] = now
        self._b[host] = b
        if len(self._b) > self.max_sources:
            self._b.popitem(last=False)
        if b[0] >= 1.0:
            b[0] -= 1.0
            return True
        return False


class DHTCore:
    """One Mainline DHT node (BEP 5, with BEP 32, 42 and 43), sans-I/O; a
    :class:`~_utpkit.contract.DatagramCore`.

    ``families`` is ``(4,)``, ``(6,)`` or ``(4, 6)`` -- one routing table
    each (BEP 32).  ``read_only`` nodes (BEP 43) ask but never answer and
    are kept out of other nodes' tables.  ``enforce_bep42`` keeps nodes
    whose id does not match their IP out of the table (local addresses are
    always exempt)."""

    def __init__(self, *, rng: random.Random, now: float, node_id: bytes | None = None,
                 families: Iterable[int] = (4,), read_only: bool = False,
                 enforce_bep42: bool = False, k: int = K, alpha: int = ALPHA,
                 query_timeout: float = QUERY_TIMEOUT, query_retries: int = QUERY_RETRIES,
                 rate: float = 50.0, burst: float = 100.0, version: bytes = VERSION,
                 peer_store: PeerStore | None = None, auto_secure_id: bool = True) -> None:
        self.rng = rng
        self.id = node_id if node_id is not None else rng.randbytes(ID_LEN)
        if len(self.id) != ID_LEN:
            raise ValueError("node id must be 20 bytes")
        self.families = tuple(sorted(set(families)))
        if not self.families or any(f not in (4, 6) for f in self.families):
            raise ValueError("families must be a non-empty subset of (4, 6)")
        self.read_only = read_only
        self.enforce_bep42 = enforce_bep42
        self.auto_secure_id = auto_secure_id
        self.k = k
        self.alpha = alpha
        self.query_timeout = query_timeout
        self.query_retries = query_retries
        self.version = version
        self.tables = {f: RoutingTable(self.id, f, now, k=k) for f in self.families}
        self.tokens = TokenManager(rng, now)
        self.store = peer_store if peer_store is not None else PeerStore()
        self.votes = AddressVotes()
        self.limiter = _RateLimiter(rate, burst)
        self._pending: dict[bytes, _Pending] = {}
        self._tid = rng.getrandbits(16)
        self._lookups: dict[int, _Lookup] = {}
        self._next_id = 1
        self._out: list[tuple[bytes, Addr]] = []
        self._events: collections.deque = collections.deque()
        self._verifying: set[Addr] = set()
        self._refreshing: set[tuple[int, int]] = set()
        self._next_maintenance = now + MAINTENANCE_INTERVAL
        self._last_expire = now
        self.counters: collections.Counter[str] = collections.Counter()

    # ---- the three inputs -----------------------------------------------------------------

    def receive_datagram(self, data: bytes, addr: Addr, now: float) -> None:
        """Handle one datagram from ``addr`` (``(host, port)``, IPv4 hosts
        in dotted form even on a dual-stack socket)."""
        self.counters["rx"] += 1
        self.counters["rx_bytes"] += len(data)
        fam = family_of(addr[0])
        if fam not in self.tables:
            self.counters["dropped_family"] += 1
            return
        try:
            msg = parse_untrusted(data)
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            if exc.tid is not None and not self.read_only and self.limiter.allow(addr[0], now):
                self._send_error(exc.tid, exc.code, exc.message, addr, len(data))
            return
        if isinstance(msg, Query):
            self._on_query(msg, addr, now, len(data))
        elif isinstance(msg, Response):
            self._on_response(msg, addr, now)
        else:
            self._on_error(msg, addr, now)

    def handle_timer(self, now: float) -> None:
        """Expire queries whose time is up and run periodic maintenance."""
        for p in [p for p in self._pending.values() if p.deadline <= now]:
            if p.retries > 0:
                p.retries -= 1
                p.deadline = now + self.query_timeout
                p.stalled = True
                self._out.append((p.data, p.addr))
                self.counters["tx"] += 1
                self.counters["retries"] += 1
                owner = p.owner
                if owner[0] in ("lookup", "announce"):
                    # The lookup stops waiting for it (BEP 5 leaves pacing
                    # to us): a slow node must not hold a slot of alpha.
                    lk = self._lookups.get(owner[1])
                    if lk is not None:
                        self._step(lk, now)
            else:
                del self._pending[p.tid]
                self.counters["timeouts"] += 1
                self._query_failed(p, now)
        if now >= self._next_maintenance:
            self._next_maintenance = now + MAINTENANCE_INTERVAL
            self._maintain(now)

    def get_timer(self) -> float:
        """The next time ``handle_timer`` has work to do (never None:
        table maintenance is always scheduled)."""
        t = self._next_maintenance
        for p in self._pending.values():
            if p.deadline < t:
                t = p.deadline
        return t

    def datagrams_to_send(self, now: float | None = None) -> list[tuple[bytes, Addr]]:
        """Remove and return ``(data, addr)`` to send.  ``now`` is accepted
        for the :class:`~_utpkit.contract.DatagramCore` contract; the DHT
        queues its datagrams when they are made, so it is not needed."""
        out, self._out = self._out, []
        return out

    def next_event(self) -> Event | None:
        """Remove and return the oldest event, or None."""
        return self._events.popleft() if self._events else None

    # ---- user calls -------------------------------------------------------------------

    def bootstrap(self, addrs: Iterable[Addr], now: float) -> list[int]:
        """Look up our own id, starting from ``addrs`` and the table.  Returns
        the lookup ids (one per address family)."""
        seeds: dict[int, list[tuple[Optional[bytes], Addr]]] = {f: [] for f in self.families}
        for a in addrs:
            f = family_of(a[0])
            if f in seeds:
                seeds[f].append((None, (a[0], int(a[1]))))
        ids = []
        for f in self.families:
            ids.append(self._start(LookupKind.BOOTSTRAP, self.id, f, now, seeds=seeds[f], internal=False))
        return ids

    def add_node(self, node_id: bytes, addr: Addr, now: float) -> None:
        """Seed the table with a node we believe in (a saved table): it is
        pinged, and added when it answers."""
        self._verify(addr, now)

    def find_node(self, target: bytes, now: float, family: int | None = None) -> int:
        return self._start(LookupKind.FIND_NODE, target, family or self.families[0], now)

    def get_peers(self, infohash: bytes, now: float, family: int | None = None) -> int:
        return self._start(LookupKind.GET_PEERS, infohash, family or self.families[0], now)

    def announce(self, infohash: bytes, now: float, port: int | None = None,
                 family: int | None = None, *, local_port: int | None = None) -> int:
        """get_peers, then announce_peer to the k closest nodes that gave us a
        token.  ``port`` None sets ``implied_port`` (the port our datagrams
        come from -- the NAT mapping of the shared socket); the ``port``
        argument BEP 5 still requires is then ``local_port`` (or 1), which
        nodes that honour implied_port ignore."""
        for p in (port, local_port):
            if p is not None and not 0 < p < 65536:
                raise ValueError("port must be 1..65535")
        return self._start(LookupKind.ANNOUNCE, infohash, family or self.families[0], now,
                           port=port if port is not None else (local_port or 1),
                           implied=port is None)

    def ping(self, addr: Addr, now: float) -> int:
        rid = self._new_id()
        self._query(addr, b"ping", {}, now, ("ping", rid))
        return rid

    def cancel(self, lookup: int) -> None:
        """Stop a lookup; its outstanding queries are forgotten, no event."""
        lk = self._lookups.pop(lookup, None)
        if lk is not None:
            for tid in [t for t, p in self._pending.items() if p.owner[1:2] == (lookup,)
                        and p.owner[0] in ("lookup", "announce")]:
                del self._pending[tid]

    def adopt_secure_id(self, host: str, now: float) -> bool:
        """Take a BEP 42 node id for external IP ``host`` unless ours already
        matches it (or ``host`` is local).  The tables are rebuilt around
        the new id from the nodes that have answered us.  True when the id
        changed."""
        if exempt_from_bep42(host) or is_secure_id(self.id, host):
            return False
        self.id = secure_id(host, self.rng.randbytes(ID_LEN))
        old = self.tables
        self.tables = {f: RoutingTable(self.id, f, now, k=self.k) for f in self.families}
        for f, t in old.items():
            for e in list(t.nodes()):
                if e.last_response >= 0:
                    self.tables[f].heard_from(e.id, e.addr, e.last_response, responded=True)
        self.counters["id_changes"] += 1
        self._events.append(NodeIdChanged(self.id))
        return True

    @property
    def external_address(self) -> Optional[Addr]:
        return self.votes.winner

    def table_size(self) -> int:
        return sum(len(t) for t in self.tables.values())

    def export_nodes(self) -> list[dict]:
        out: list[dict] = []
        for t in self.tables.values():
            out.extend(t.export())
        return out

    def statistics(self) -> dict[str, Any]:
        return {
            "id": self.id.hex(),
            "nodes": {f"ipv{f}": len(t) for f, t in self.tables.items()},
            "buckets": {f"ipv{f}": len(t.buckets) for f, t in self.tables.items()},
            "replacements": sum(len(b.replacements) for t in self.tables.values() for b in t.buckets),
            "pending_queries": len(self._pending),
            "lookups": len(self._lookups),
            "peers_stored": len(self.store),
            "infohashes_stored": self.store.infohashes,
            "external_address": self.votes.winner,
            "counters": dict(self.counters),
        }

    # ---- sending ----------------------------------------------------------------------

    def _new_id(self) -> int:
        i = self._next_id
        self._next_id += 1
        return i

    def _new_tid(self) -> bytes:
        for _ in range(65536):
            self._tid = (self._tid + 1) & 0xFFFF
            tid = self._tid.to_bytes(2, "big")
            if tid not in self._pending:
                return tid
        raise RuntimeError("no free transaction id")

    def _query(self, addr: Addr, method: bytes, args: dict, now: float, owner: Any,
               expect_id: bytes | None = None) -> bool:
        if len(self._pending) >= MAX_PENDING:
            self.counters["pending_full"] += 1
            return False
        tid = self._new_tid()
        a: dict[bytes, Any] = {b"id": self.id}
        a.update(args)
        if len(self.families) == 2:
            a[b"want"] = [b"n4", b"n6"]
        data = build_query(tid, method, a, version=self.version, read_only=self.read_only)
        self._pending[tid] = _Pending(tid, addr, method, data, now, now + self.query_timeout,
                                      self.query_retries, owner, expect_id)
        self._out.append((data, addr))
        self.counters["tx"] += 1
        self.counters["tx_query_" + method.decode()] += 1
        return True

    def _send_response(self, q: Query, values: dict, addr: Addr, budget: int) -> None:
        data: Optional[bytes] = build_response(q.tid, values, version=self.version, ip=addr)
        if data is not None and len(data) > budget:
            data = self._shrink(q, values, addr, budget)
        if data is None:
            self.counters["response_too_large"] += 1
            return
        self._out.append((data, addr))
        self.counters["tx"] += 1
        self.counters["tx_response"] += 1

    def _shrink(self, q: Query, values: dict, addr: Addr, budget: int) -> Optional[bytes]:
        """Trim peer values, then nodes, until the response fits the budget
        (no amplification)."""
        values = dict(values)
        for key, unit in ((b"values", None), (b"nodes6", 38), (b"nodes", 26)):
            while key in values:
                data = build_response(q.tid, values, version=self.version, ip=addr)
                if len(data) <= budget:
                    return data
                v = values[key]
                if unit is None:
                    if len(v) <= 1:
                        del values[key]
                    else:
                        values[key] = v[:max(1, len(v) // 2)]
                else:
                    if len(v) <= unit:
                        del values[key]
                    else:
                        values[key] = v[:len(v) - unit]
        data = build_response(q.tid, values, version=self.version, ip=addr)
        return data if len(data) <= budget else None

    def _send_error(self, tid: bytes, code: int, message: str, addr: Addr, req_len: int) -> None:
        data = build_error(tid, code, message, version=self.version, ip=addr)
        if len(data) > AMPLIFICATION * req_len:
            data = build_error(tid, code, "", version=self.version)
        if len(data) > AMPLIFICATION * req_len:
            self.counters["response_too_large"] += 1    # an error is not worth amplifying
            return
        self._out.append((data, addr))
        self.counters["tx"] += 1
        self.counters["tx_error_%d" % code] += 1

    # ---- incoming queries -----------------------------------------------------------------

    def _closest_compact(self, family: int, target: bytes, now: float) -> bytes:
        t = self.tables.get(family)
        if t is None:
            return b""
        return pack_nodes([(e.id, e.addr) for e in t.closest(target, self.k, now)])

    def _node_fields(self, q: Query, target: bytes, fam: int, now: float) -> dict:
        want = q.want or frozenset([fam])
        out = {}
        if 4 in want and 4 in self.tables:
            out[b"nodes"] = self._closest_compact(4, target, now)
        if 6 in want and 6 in self.tables:
            out[b"nodes6"] = self._closest_compact(6, target, now)
        return out

    def _on_query(self, q: Query, addr: Addr, now: float, size: int) -> None:
        self.counters["rx_query"] += 1
        if self.read_only:
            self.counters["ignored_read_only"] += 1     # BEP 43: we never answer
            return
        if not self.limiter.allow(addr[0], now):
            self.counters["rate_limited"] += 1
            return
        fam = family_of(addr[0])
        # One budget per query, whatever 'want' asks for: both families'
        # nodes and the peer values all come out of it (nodes6 and nodes are
        # trimmed first, see _shrink), so no answer exceeds 4x its request.
        budget = AMPLIFICATION * size
        args = q.args
        method = q.method
        values: dict[bytes, Any]
        self.counters["rx_query_" + method.decode()] += 1
        try:
            if method == b"ping":
                values = {b"id": self.id}
            elif method == b"find_node":
                target = args.get(b"target")
                if not isinstance(target, bytes) or len(target) != ID_LEN:
                    raise ProtocolError(ERROR_PROTOCOL, "malformed 'target'", q.tid)
                values = {b"id": self.id}
                values.update(self._node_fields(q, target, fam, now))
            elif method == b"get_peers":
                ih = args.get(b"info_hash")
                if not isinstance(ih, bytes) or len(ih) != ID_LEN:
                    raise ProtocolError(ERROR_PROTOCOL, "malformed 'info_hash'", q.tid)
                values = {b"id": self.id, b"token": self.tokens.issue(addr[0], now)}
                # Peers first (BEP 5), as many as the budget allows; nodes
                # only if they still fit.
                base = len(build_response(q.tid, values, version=self.version, ip=addr))
                entry = 8 if fam == 4 else 21          # "6:" + 6 bytes, "18:" + 18 bytes
                room = (budget - base - len(b"6:valuesle")) // entry
                peers = self.store.get(ih, now, fam, min(50, max(room, 0)), self.rng)
                if peers:
                    values[b"values"] = peers
                    nodes = self._node_fields(q, ih, fam, now)
                    nodes_len = sum(len(k) + len(str(len(k))) + 1 + len(v) + len(str(len(v))) + 1
                                    for k, v in nodes.items())
                    if base + len(b"6:valuesle") + entry * len(peers) + nodes_len <= budget:
                        values.update(nodes)
                else:
                    values.update(self._node_fields(q, ih, fam, now))
            else:  # announce_peer
                ih = args.get(b"info_hash")
                token = args.get(b"token")
                implied = args.get(b"implied_port", 0)
                port = args.get(b"port")
                if not isinstance(ih, bytes) or len(ih) != ID_LEN:
                    raise ProtocolError(ERROR_PROTOCOL, "malformed 'info_hash'", q.tid)
                if not isinstance(token, bytes):
                    raise ProtocolError(ERROR_PROTOCOL, "missing 'token'", q.tid)
                if implied == 1:
                    port = addr[1]
                elif not isinstance(port, int) or not 0 < port < 65536:
                    raise ProtocolError(ERROR_PROTOCOL, "malformed 'port'", q.tid)
                if not self.tokens.check(token, addr[0], now):
                    self.counters["bad_token"] += 1
                    raise ProtocolError(ERROR_PROTOCOL, "bad token", q.tid)
                self.store.add(ih, (addr[0], port), now)
                values = {b"id": self.id}
        except ProtocolError as exc:
            self.counters["malformed"] += 1
            self._send_error(q.tid, exc.code, exc.message, addr, size)
            return
        self._send_response(q, values, addr, budget)
        # BEP 43: read-only nodes are not added.  Nodes that query us are
        # verified with a ping before they enter the table: the source
        # address of a query is not proof of anything.
        if not q.read_only and self._id_acceptable(q.sender, addr):
            r = self.tables[fam].heard_from(q.sender, addr, now, responded=False)
            if r == "unverified":
                self._verify(addr, now)

    def _id_acceptable(self, node_id: bytes, addr: Addr) -> bool:
        if not self.enforce_bep42 or is_secure_id(node_id, addr[0]):
            return True
        self.counters["bep42_rejected"] += 1
        return False

    def _verify(self, addr: Addr, now: float) -> None:
        if addr in self._verifying or len(self._verifying) >= 64:
            return
        self._verifying.add(addr)
        self._query(addr, b"ping", {}, now, ("verify",))

    # ---- responses ------------------------------------------------------------------------

    def _on_response(self, r: Response, addr: Addr, now: float) -> None:
        self.counters["rx_response"] += 1
        p = self._pending.get(r.tid)
        if p is None or p.addr != addr:
            self.counters["unexpected_response"] += 1
            return
        if p.expect_id is not None and p.expect_id != r.sender:
            # Another node answers from the address we knew: not the one we asked.
            pass
        del self._pending[r.tid]
        fam = family_of(addr[0])
        if r.ip is not None and family_of(r.ip[0]) == fam:
            if self.votes.vote_of(addr[0]) != r.ip:
                self._events.append(AddressReported(addr[0], r.ip))
            if self.votes.add(addr[0], r.ip, now):
                self._events.append(ExternalAddressChanged(self.votes.winner))
                if self.auto_secure_id and self.votes.winner is not None:
                    self.adopt_secure_id(self.votes.winner[0], now)
        if self._id_acceptable(r.sender, addr):
            res = self.tables[fam].heard_from(r.sender, addr, now, responded=True)
            if res == "replacement":
                old = self.tables[fam].questionable_to_ping(r.sender, now)
                if old is not None:
                    self._verify(old.addr, now)
        owner = p.owner
        kind = owner[0]
        if kind == "ping":
            self._events.append(PingDone(owner[1], addr, r.sender, now - p.sent_at))
        elif kind == "verify":
            self._verifying.discard(addr)
        elif kind == "lookup":
            lk = self._lookups.get(owner[1])
            if lk is not None:
                self._lookup_response(lk, r, addr, now)
        elif kind == "announce":
            lk = self._lookups.get(owner[1])
            if lk is not None:
                lk.announced += 1
                lk.announce_pending -= 1
                self._maybe_finish_announce(lk, now)

    def _on_error(self, e: Error, addr: Addr, now: float) -> None:
        self.counters["rx_error"] += 1
        p = self._pending.get(e.tid)
        if p is None or p.addr != addr:
            self.counters["unexpected_response"] += 1
            return
        del self._pending[e.tid]
        owner = p.owner
        if owner[0] == "announce":
            lk = self._lookups.get(owner[1])
            if lk is not None:
                lk.announce_pending -= 1
                lk.announce_errors.append(f"{addr[0]}:{addr[1]}: {e.code} {e.message}")
                self._maybe_finish_announce(lk, now)
            return
        # An error answer is an answer: the node is alive but useless here.
        self._query_failed(p, now, alive=True)

    def _query_failed(self, p: _Pending, now: float, alive: bool = False) -> None:
        fam = family_of(p.addr[0])
        if not alive and p.expect_id is not None:
            self.tables[fam].failed(p.expect_id, p.addr, now)
        elif not alive:
            e = self.tables[fam].get_by_addr(p.addr)
            if e is not None:
                self.tables[fam].failed(e.id, p.addr, now)
        owner = p.owner
        if owner[0] == "ping":
            self._events.append(PingDone(owner[1], p.addr, None, None))
        elif owner[0] == "verify":
            self._verifying.discard(p.addr)
        elif owner[0] == "lookup":
            lk = self._lookups.get(owner[1])
            if lk is not None:
                c = lk.cands.get(p.addr)
                if c is not None:
                    c.state = _FAILED
                self._step(lk, now)
        elif owner[0] == "announce":
            lk = self._lookups.get(owner[1])
            if lk is not None:
                lk.announce_pending -= 1
                lk.announce_errors.append(f"{p.addr[0]}:{p.addr[1]}: no answer")
                self._maybe_finish_announce(lk, now)

    # ---- lookups ----------------------------------------------------------------------

    def _start(self, kind: LookupKind, target: bytes, family: int, now: float, *,
               seeds: Iterable[tuple[Optional[bytes], Addr]] = (), internal: bool = False,
               port: Optional[int] = None, implied: bool = False) -> int:
        if len(target) != ID_LEN:
            raise ValueError("target must be 20 bytes")
        if family not in self.tables:
            raise ValueError(f"this node has no IPv{family} table")
        lk = _Lookup(self._new_id(), kind, target, family, internal=internal, port=port,
                     implied=implied)
        self._lookups[lk.id] = lk
        self.counters["lookups_started"] += 1
        for nid, addr in seeds:
            lk.add(nid, addr, 1)
        for e in self.tables[family].closest(target, self.k * 2, now):
            lk.add(e.id, e.addr, 1)
        self._step(lk, now)
        return lk.id

    def _lookup_response(self, lk: _Lookup, r: Response, addr: Addr, now: float) -> None:
        c = lk.cands.get(addr)
        if c is None:
            return
        if c.id is None:   # a bootstrap address: now we know who it is
            c.id = r.sender
            c.dist = lk.tint ^ int.from_bytes(r.sender, "big")
            lk.seen_ids.add(r.sender)
        elif c.id != r.sender:
            c.state = _FAILED   # someone else answers at that address
            self._step(lk, now)
            return
        c.state = _OK
        lk.responded += 1
        key = b"nodes" if lk.family == 4 else b"nodes6"
        raw = r.values.get(key)
        if isinstance(raw, bytes):
            try:
                for nid, naddr in unpack_nodes_untrusted(raw, lk.family)[:2 * self.k]:
                    if nid != self.id and family_of(naddr[0]) == lk.family:
                        lk.add(nid, naddr, c.depth + 1)
            except ProtocolError:
                self.counters["malformed_nodes"] += 1
        if lk.kind in _PEER_KINDS:
            tok = r.values.get(b"token")
            if isinstance(tok, bytes) and len(tok) <= 64:
                c.token = tok
            vals = r.values.get(b"values")
            if isinstance(vals, list):
                new = []
                for v in vals[:200]:
                    if isinstance(v, bytes) and v not in lk.peers:
                        a = unpack_addr_untrusted(v)
                        if a is not None:
                            lk.peers.add(v)
                            new.append(a)
                if new and not lk.internal:
                    self._events.append(PeersFound(lk.id, tuple(new)))
        self._step(lk, now)

    def _step(self, lk: _Lookup, now: float) -> None:
        """Send queries and decide whether the lookup is done.

        Done when each of the k closest candidates still in the running has
        answered (closest-k termination).  A candidate whose query has timed
        out once ("stalled", its resend still out) no longer holds one of
        the alpha slots, but it still blocks the end until it answers or
        fails: with 5% loss, 150 nodes, 35 of 40 lookups end with exactly
        the true k closest this way, about half when stalled nodes are
        dropped; the price is up to one more timeout (1.5 s) per dead node."""
        if lk.phase is not LookupPhase.SEARCH:
            return
        mine = [p for p in self._pending.values() if p.owner == ("lookup", lk.id)]
        stalled = {p.addr for p in mine if p.stalled}
        inflight = len(mine) - len(stalled)
        ordered = sorted((c for c in lk.cands.values() if c.state is not _FAILED), key=lambda c: c.dist)
        top = ordered[:self.k]
        method = b"find_node" if lk.kind in _FIND_KINDS else b"get_peers"
        key = b"target" if method == b"find_node" else b"info_hash"
        for c in top:
            if inflight >= self.alpha or lk.queried >= MAX_LOOKUP_QUERIES:
                break
            if c.state is _NEW:
                if not self._query(c.addr, method, {key: lk.target}, now, ("lookup", lk.id), c.id):
                    break
                c.state = _PENDING
                lk.queried += 1
                inflight += 1
        if any(c.state is _PENDING for c in top):
            return
        if inflight and lk.queried < MAX_LOOKUP_QUERIES and any(c.state is _NEW for c in top):
            return      # waiting for a slot
        self._finish_search(lk, now)

    def _finish_search(self, lk: _Lookup, now: float) -> None:
        # Forget queries still out for this lookup: their answers are too late.
        for tid in [t for t, p in self._pending.items() if p.owner == ("lookup", lk.id)]:
            del self._pending[tid]
        ok = sorted((c for c in lk.cands.values() if c.state is _OK and c.id is not None),
                    key=lambda c: c.dist)[:self.k]
        lk.result = tuple((c.id, c.addr) for c in ok)
        lk.hops = max((c.depth for c in ok), default=0)
        if lk.kind is LookupKind.ANNOUNCE:
            lk.phase = LookupPhase.ANNOUNCE
            for c in ok:
                if c.token is None:
                    continue
                args: dict = {b"info_hash": lk.target, b"token": c.token,
                              b"port": lk.port}
                if lk.implied:
                    args[b"implied_port"] = 1
                if self._query(c.addr, b"announce_peer", args, now, ("announce", lk.id), c.id):
                    lk.announce_pending += 1
            self._maybe_finish_announce(lk, now)
            return
        self._done(lk)

    def _maybe_finish_announce(self, lk: _Lookup, now: float) -> None:
        if lk.phase is LookupPhase.ANNOUNCE and lk.announce_pending <= 0:
            self._done(lk)

    def _done(self, lk: _Lookup) -> None:
        lk.phase = LookupPhase.DONE
        self._lookups.pop(lk.id, None)
        self.counters["lookups_done"] += 1
        if lk.kind is LookupKind.REFRESH:
            self._refreshing.discard((lk.family, lk.id))
        if lk.internal:
            return
        self._events.append(LookupDone(
            lk.id, lk.kind, lk.target, lk.result, lk.queried, lk.responded, lk.hops,
            lk.announced if lk.kind is LookupKind.ANNOUNCE else None, tuple(lk.announce_errors)))

    # ---- maintenance ------------------------------------------------------------------

    def _maintain(self, now: float) -> None:
        if now - self._last_expire >= 60:
            self._last_expire = now
            self.store.expire(now)
        running = {lk.family for lk in self._lookups.values() if lk.kind is LookupKind.REFRESH}
        for fam, table in self.tables.items():
            if fam in running or len(table) == 0:
                continue
            stale = table.stale_buckets(now)
            if stale:
                i = stale[0]
                table.buckets[i].last_changed = now
                target = table.random_id_in_bucket(i, self.rng)
                self._start(LookupKind.REFRESH, target, fam, now, internal=True)
