"""The trio driver: a :class:`DHTCore` on an Endpoint's shared socket.

The core never sees trio; this module feeds it the Endpoint's ``"dht"``
datagram queue and trio's clock, sends what it produces with
``Endpoint.sendto`` and turns its events into awaitable results.  The
plumbing (``_pump``, the receive, send and timer loops) uses only the
:class:`~_utpkit.contract.DatagramCore` contract; the user calls (ping,
get_peers, announce, ...) are the DHT's own.
"""

from __future__ import annotations

import collections
import math
import os
import random
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Iterable, Optional

import trio

from _utpkit.addr import parse_hostport as _parse_hostport
from _utpkit.addr import unmap_host
from _utpkit.contract import DatagramCore
from _utpkit.excgroup import unwrapped

from ._core import (AddressReported, DHTCore, ExternalAddressChanged, LookupDone, PeersFound,
                    PingDone)
from ._table import load_state, save_state
from ._wire import ID_LEN, Addr, unpack_addr_untrusted

__all__ = ["open_node", "DHTNode", "PeerSearch", "DHTAnnounceResult", "parse_hostport"]


def parse_hostport(text: str) -> Addr:
    """``HOST:PORT`` or ``[V6HOST]:PORT`` with a literal IP address (a bare
    IPv6 address splits at its last colon).  Raises ValueError."""
    return _parse_hostport(text, bare_ipv6=True)


class DHTAnnounceResult:
    """What a DHT announce achieved: ``accepted`` of the closest ``nodes``
    stored us; ``errors`` says why the others did not.  (Not the tracker's
    :class:`tracker.TrackerAnnounceResult`, a peer list.)"""

    def __init__(self, accepted: int, nodes: tuple, errors: tuple) -> None:
        self.accepted = accepted
        self.nodes = nodes
        self.errors = errors

    def __repr__(self) -> str:
        return f"DHTAnnounceResult(accepted={self.accepted}, nodes={len(self.nodes)}, errors={list(self.errors)})"


class _Waiter:
    """Collects the events of one or more core lookups."""

    def __init__(self, lookups: list[int]) -> None:
        self.lookups = set(lookups)
        self.results: list[LookupDone] = []
        self.peers: collections.deque[Addr] = collections.deque()
        self.seen: set[Addr] = set()
        self.done = trio.Event()
        self.lot = trio.lowlevel.ParkingLot()

    def on_event(self, ev: Any) -> None:
        if isinstance(ev, PeersFound):
            for p in ev.peers:
                if p not in self.seen:
                    self.seen.add(p)
                    self.peers.append(p)
        elif isinstance(ev, LookupDone):
            self.results.append(ev)
            self.lookups.discard(ev.lookup)
            if not self.lookups:
                self.done.set()
        self.lot.unpark_all()


class PeerSearch:
    """The peers of one infohash as they arrive: ``async for peer in
    node.get_peers(ih)``.  Iteration ends when the lookup is done; then
    :attr:`nodes` holds the k closest nodes that answered (the ones an
    announce goes to) and :attr:`lookups` the core's LookupDone records.

    Cancellation: abandoning the iteration leaves the lookup to finish in
    the background (it is bounded in queries and time)."""

    def __init__(self, node: DHTNode, waiter: _Waiter) -> None:
        self._node = node
        self._w = waiter

    def __aiter__(self) -> PeerSearch:
        return self

    async def __anext__(self) -> Addr:
        await trio.lowlevel.checkpoint()
        while True:
            if self._w.peers:
                return self._w.peers.popleft()
            if self._w.done.is_set():
                raise StopAsyncIteration
            await self._w.lot.park()

    async def wait(self) -> list[Addr]:
        """Wait for the end of the lookup; all the peers found."""
        await self._w.done.wait()
        self._w.peers.clear()
        return list(self._w.seen)

    @property
    def nodes(self) -> list[tuple[bytes, Addr]]:
        return [n for r in self._w.results for n in r.nodes]

    @property
    def lookups(self) -> list[LookupDone]:
        return list(self._w.results)


class DHTNode:
    """A DHT node on an Endpoint.  Create it with :func:`open_node`."""

    def __init__(self, endpoint: Any, core: DHTCore, queue: Any, *, dual: bool) -> None:
        self.endpoint = endpoint
        self.core = core
        # The plumbing below sees only the contract.
        self._core: DatagramCore = core
        self._queue = queue
        self._dual = dual       # an AF_INET6 socket: IPv4 peers appear as ::ffff:a.b.c.d
        self._out: collections.deque[tuple[bytes, Addr]] = collections.deque()
        self._send_lot = trio.lowlevel.ParkingLot()
        self._timer_lot = trio.lowlevel.ParkingLot()
        self._waiters: dict[int, _Waiter] = {}
        self._pings: dict[int, list] = {}
        self.external_address: Optional[Addr] = None
        self.send_errors = 0
        self.closed = False
        #: Whether the id may change to a BEP 42 id (not when the caller fixed it).
        self._auto_id = True

    def _check_open(self) -> None:
        if self.closed:
            raise trio.ClosedResourceError("the DHT node is closed")

    def _close(self) -> None:
        """Wake everything still waiting on the core: searches end, pings
        and announces raise ClosedResourceError."""
        self.closed = True
        for w in list(self._waiters.values()):
            w.done.set()
            w.lot.unpark_all()
        self._waiters.clear()
        for slot in self._pings.values():
            slot[0].set()
        self._pings.clear()

    # ---- address mapping ------------------------------------------------------------------

    def _from_socket(self, addr: Any) -> Addr:
        return (unmap_host(addr[0]), int(addr[1]))

    def _to_socket(self, addr: Addr) -> Any:
        if self._dual and ":" not in addr[0]:
            return ("::ffff:" + addr[0], addr[1])
        return addr

    # ---- plumbing -------------------------------------------------------------------------

    def _pump(self) -> None:
        """After every core call: queue its datagrams, deliver its events,
        re-arm the timer."""
        core = self._core
        out = core.datagrams_to_send(trio.current_time())
        if out:
            self._out.extend(out)
            self._send_lot.unpark_all()
        while True:
            ev = core.next_event()
            if ev is None:
                break
            self._dispatch(ev)
        self._timer_lot.unpark_all()

    def _dispatch(self, ev: Any) -> None:
        if isinstance(ev, (PeersFound, LookupDone)):
            w = self._waiters.get(ev.lookup)
            if w is not None:
                w.on_event(ev)
                if isinstance(ev, LookupDone):
                    del self._waiters[ev.lookup]
        elif isinstance(ev, PingDone):
            slot = self._pings.pop(ev.request, None)
            if slot is not None:
                slot[1] = ev
                slot[0].set()
        elif isinstance(ev, ExternalAddressChanged):
            self.external_address = ev.addr
        elif isinstance(ev, AddressReported):
            # The Endpoint tallies votes from every source sharing the socket
            # (DHT, trackers, BitTorrent's yourip) when it offers the hook.
            hook = getattr(self.endpoint, "vote_external_address", None)
            if hook is not None:
                hook(ev.addr, reporter=ev.reporter, source="dht")

    async def _receive_loop(self) -> None:
        async for data, addr in self._queue:
            try:
                src = self._from_socket(addr)
            except (TypeError, ValueError, IndexError):
                continue
            self._core.receive_datagram(data, src, trio.current_time())
            self._pump()

    async def _send_loop(self) -> None:
        while True:
            while not self._out:
                await self._send_lot.park()
            data, addr = self._out.popleft()
            try:
                await self.endpoint.sendto(data, self._to_socket(addr))
            except (OSError, ValueError):
                self.send_errors += 1   # unreachable address family, bad address

    async def _timer_loop(self) -> None:
        core = self._core
        while True:
            deadline = core.get_timer()
            if deadline is None:
                deadline = math.inf
            if trio.current_time() >= deadline:
                core.handle_timer(trio.current_time())
                self._pump()
                await trio.lowlevel.checkpoint()
                continue
            with trio.move_on_at(deadline):
                await self._timer_lot.park()

    def _track(self, lookups: list[int]) -> _Waiter:
        w = _Waiter(lookups)
        for lid in lookups:
            self._waiters[lid] = w
        self._pump()
        return w

    def _families(self, family: int | None) -> tuple[int, ...]:
        return self.core.families if family is None else (family,)

    # ---- public ---------------------------------------------------------------------------

    async def ping(self, addr: Addr) -> Optional[bytes]:
        """The node id of ``addr``, or None when it did not answer (after
        the core's timeout and one resend).

        Error handling: ClosedResourceError once the node is closed."""
        await trio.lowlevel.checkpoint()
        self._check_open()
        rid = self.core.ping((addr[0], int(addr[1])), trio.current_time())
        slot: list = [trio.Event(), None]
        self._pings[rid] = slot
        self._pump()
        await slot[0].wait()
        if slot[1] is None:
            raise trio.ClosedResourceError("the DHT node closed during the ping")
        return slot[1].node_id

    def get_peers(self, infohash: bytes, *, family: int | None = None) -> PeerSearch:
        """Start a get_peers lookup (on every address family of the node
        unless ``family`` is 4 or 6); iterate over the result for peers.
        If the node closes meanwhile, the iteration just ends."""
        self._check_open()
        _check_id(infohash)
        now = trio.current_time()
        ids = [self.core.get_peers(infohash, now, f) for f in self._families(family)]
        return PeerSearch(self, self._track(ids))

    async def announce(self, infohash: bytes, port: int | None = None, *,
                       family: int | None = None) -> DHTAnnounceResult:
        """Announce that we are a peer for ``infohash`` to the k closest
        nodes.  ``port`` None sends ``implied_port=1``: the port other nodes
        see our datagrams come from, which behind a NAT is the mapping our
        uTP connections use too.

        Cancellation: the announce goes on in the background until done.
        Error handling: ClosedResourceError once the node is closed; a
        result with ``accepted == 0`` when no node stored us."""
        self._check_open()
        _check_id(infohash)
        await trio.lowlevel.checkpoint()
        now = trio.current_time()
        local_port = int(self.endpoint.local_address[1]) or None
        ids = [self.core.announce(infohash, now, port, f, local_port=local_port)
               for f in self._families(family)]
        w = self._track(ids)
        await w.done.wait()
        self._check_open()
        return DHTAnnounceResult(sum(r.announced or 0 for r in w.results),
                              tuple(n for r in w.results for n in r.nodes),
                              tuple(e for r in w.results for e in r.announce_errors))

    def announce_search(self, infohash: bytes, port: int | None = None, *,
                        family: int | None = None) -> PeerSearch:
        """get_peers and announce_peer in one traversal (what a BitTorrent
        client does each announce interval): iterate for the peers found on
        the way; the iteration ends once the announce went out.  ``port``
        None sends ``implied_port=1`` (see :meth:`announce`)."""
        self._check_open()
        _check_id(infohash)
        now = trio.current_time()
        local_port = int(self.endpoint.local_address[1]) or None
        ids = [self.core.announce(infohash, now, port, f, local_port=local_port)
               for f in self._families(family)]
        return PeerSearch(self, self._track(ids))

    def adopt_external_address(self, host: str) -> bool:
        """Another source (the Endpoint's tally of every report) says our
        public IP is ``host``: take a BEP 42 id for it unless ours already
        matches (or ``host`` is local, or the id was given explicitly).
        True when the id changed."""
        self._check_open()
        if not self._auto_id:
            return False
        changed = self.core.adopt_secure_id(host, trio.current_time())
        self._pump()
        return changed

    def stored_peers(self, infohash: bytes, limit: int = 100) -> list[Addr]:
        """Peers that announced ``infohash`` to this node (our own store,
        which no lookup of ours asks: in a small DHT we may be the node
        closest to the infohash)."""
        now = trio.current_time()
        out: list[Addr] = []
        for fam in self.core.families:
            for raw in self.core.store.get(bytes(infohash), now, fam, limit, self.core.rng):
                a = unpack_addr_untrusted(raw)
                if a is not None:
                    out.append(a)
        return out

    async def find_node(self, target: bytes, *, family: int | None = None) -> list[tuple[bytes, Addr]]:
        """The k closest nodes to ``target`` that answered, closest first."""
        self._check_open()
        _check_id(target)
        now = trio.current_time()
        w = self._track([self.core.find_node(target, now, f) for f in self._families(family)])
        await w.done.wait()
        self._check_open()
        return [n for r in w.results for n in r.nodes]

    async def bootstrap(self, addrs: Iterable[Addr]) -> list[LookupDone]:
        """Look up our own id starting from ``addrs`` (and the table)."""
        self._check_open()
        w = self._track(self.core.bootstrap([(a[0], int(a[1])) for a in addrs], trio.current_time()))
        await w.done.wait()
        return w.results

    @property
    def node_id(self) -> bytes:
        return self.core.id

    def statistics(self) -> dict[str, Any]:
        """The core's counters and table sizes, the datagram queue's counts
        and drops, and the datagrams waiting to be sent."""
        s = self.core.statistics()
        s["queue"] = self._queue.statistics()
        s["send_backlog"] = len(self._out)
        s["send_errors"] = self.send_errors
        return s


# The name before the tracker's result got its own (deprecated; kept working).
AnnounceResult = DHTAnnounceResult


def _check_id(v: bytes) -> None:
    if not isinstance(v, (bytes, bytearray)) or len(v) != ID_LEN:
        raise ValueError("expected a 20-byte id / infohash")


async def _save_loop(core: DHTCore, path: str, interval: float) -> None:
    while True:
        await trio.sleep(interval)
        try:
            save_state(path, core.id, core.export_nodes())
        except OSError:
            pass    # a full disk must not stop the node; the next attempt may work


@asynccontextmanager
async def open_node(endpoint: Any, *, bootstrap: Iterable[Addr] = (), node_id: bytes | None = None,
                    state_file: str | None = None, read_only: bool = False,
                    enforce_bep42: bool = False, families: Iterable[int] | None = None,
                    wait_bootstrap: bool = True, seed: int | None = None,
                    queue_size: int = 1024, save_interval: float = 600.0,
                    **core_options: Any) -> AsyncIterator[DHTNode]:
    """Run a DHT node on ``endpoint`` (a :class:`utp.Endpoint`) for the
    duration of the block.

    ``bootstrap`` lists ``(host, port)`` nodes to start from; nothing else
    is contacted (no public bootstrap nodes by default).  ``state_file``
    keeps the node id and the routing table across runs: it is read at the
    start (its nodes join the bootstrap addresses), written every
    ``save_interval`` seconds (so a crash loses little) and at the end.
    When ``endpoint`` has ``vote_external_address(addr, reporter=, source=)``
    the node calls it with every address another node reports for us
    (BEP 42 ``ip``), so the Endpoint can tally votes across sources.  With
    ``wait_bootstrap`` the block starts once the bootstrap lookup is done.
    ``families`` defaults from the socket: (4,) for IPv4, (6,) for IPv6,
    (4, 6) for the dual-stack wildcard ``::``.

    Resource handling: the node's tasks live in a nursery inside this
    block; the Endpoint's ``"dht"`` queue belongs to the node.
    """
    local = endpoint.local_address
    is_v6 = len(local) == 4 or ":" in str(local[0])
    if families is None:
        families = (4, 6) if is_v6 and local[0] in ("::", "") else ((6,) if is_v6 else (4,))
    saved_nodes: list = []
    node_id_given = node_id     # an explicit id is kept; otherwise BEP 42 may replace it
    if state_file is not None:
        saved_id, saved_nodes = load_state(state_file)
        if node_id is None:
            node_id = saved_id
    rng = random.Random(seed) if seed is not None else random.Random(int.from_bytes(os.urandom(16), "big"))
    core = DHTCore(rng=rng, now=trio.current_time(), node_id=node_id, families=families,
                   read_only=read_only, enforce_bep42=enforce_bep42,
                   **{"auto_secure_id": node_id_given is None, **core_options})
    queue = endpoint.datagram_queue("dht", maxlen=queue_size)
    node = DHTNode(endpoint, core, queue, dual=is_v6)
    node._auto_id = node_id_given is None
    try:
        # The node's nursery is ours: an exception from the caller's block
        # comes out as itself, not in a group (trio >= 0.25).
        async with unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(node._receive_loop)
            nursery.start_soon(node._send_loop)
            nursery.start_soon(node._timer_loop)
            if state_file is not None:
                nursery.start_soon(_save_loop, core, state_file, save_interval)
            now = trio.current_time()
            boot = list(bootstrap) + [a for _, a in saved_nodes]
            if boot:
                if wait_bootstrap:
                    await node.bootstrap(boot)
                else:
                    node._track(core.bootstrap([(a[0], int(a[1])) for a in boot], now))
            node._pump()
            yield node
            nursery.cancel_scope.cancel()
    finally:
        node._close()
        queue.close()
        if state_file is not None:
            try:
                save_state(state_file, core.id, core.export_nodes())
            except OSError:
                pass
