"""The session's DHT (BEP 5) for its torrents: one :mod:`dht` node on the
session's Endpoint (the one UDP port that uTP and the trackers use), and
per torrent a loop of get_peers + announce_peer with ``implied_port``.

Cadence, after libtorrent: a torrent announces when it starts (as soon as
the node knows another node) and then every :data:`DHT_ANNOUNCE_INTERVAL`
(its ``dht_announce_interval``, 15 minutes).  One change: while a torrent has no peer at all (a magnet link
nobody answered yet, a swarm that was empty), it searches again sooner,
:data:`EMPTY_RETRY` seconds doubling up to the interval, since a peer that
announces a minute after us would otherwise wait a quarter of an hour to
be found.  Peers announced *to* our node are used too, and while a
torrent has no peer they are dialed as they arrive: in a small DHT we may
be the node closest to the infohash, and no lookup asks itself.

Private torrents (BEP 27) never touch the DHT: a magnet link's torrent
stops its loop once the info dictionary says ``private``.

External address: the node's BEP 42 id follows the Endpoint's tally of
reports (DHT ``ip``, BEP 10 ``yourip``, trackers), checked every
:data:`EXTERNAL_CHECK` seconds.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import trio

if TYPE_CHECKING:
    from .session import Session
    from .torrent import Torrent

__all__ = ["SessionDHT", "DHT_ANNOUNCE_INTERVAL", "EMPTY_RETRY", "EXTERNAL_CHECK",
           "WATCH_INTERVAL"]

#: libtorrent's dht_announce_interval (settings_pack default, 15 * 60 s).
DHT_ANNOUNCE_INTERVAL = 15 * 60.0
#: First re-search delay for a torrent without peers (doubling).
EMPTY_RETRY = 5.0
#: How often a torrent's loop looks at its state (and, without peers, at
#: the peers announced to our own node; a dictionary lookup).
WATCH_INTERVAL = 0.5
#: The same before a torrent's first announce.
FIRST_WATCH = 0.05
#: How often the node's id is checked against the Endpoint's external address
#: (a property read: cheap).
EXTERNAL_CHECK = 5.0


class SessionDHT:
    """A session's DHT node and its torrents' announce loops (module
    docstring).  ``node`` is a :class:`dht.DHTNode` on the session's
    Endpoint; the loops run in ``nursery`` (the session's)."""

    def __init__(self, session: "Session", node: Any, nursery: trio.Nursery) -> None:
        self.session = session
        self.node = node
        self._nursery = nursery
        self.counters: dict[str, int] = {"announces": 0, "peers_found": 0}

    def add(self, torrent: "Torrent") -> None:
        """Start the torrent's loop (it ends when the torrent is removed or
        turns out private)."""
        self._nursery.start_soon(self._torrent_loop, torrent)

    def _gone(self, torrent: "Torrent") -> bool:
        return self.session.torrents.get(torrent.info_hash) is not torrent

    async def _torrent_loop(self, torrent: "Torrent") -> None:
        retry = EMPTY_RETRY
        next_at = trio.current_time()
        had_peers = False
        offered: set[tuple[str, int]] = set()
        announced = False
        while not self._gone(torrent):
            if torrent.private:
                return
            now = trio.current_time()
            if torrent.active:
                if had_peers and not torrent.peers:
                    next_at = now       # lost every peer: search again now, not in 15 min
                if now >= next_at and self.node.core.table_size() > 0:
                    await self.announce(torrent)
                    announced = True
                    had_peers = bool(torrent.peers)
                    if had_peers:
                        wait, retry = DHT_ANNOUNCE_INTERVAL, EMPTY_RETRY
                    else:
                        wait, retry = retry, min(retry * 2, DHT_ANNOUNCE_INTERVAL)
                    next_at = trio.current_time() + wait
                elif not torrent.peers:
                    # between rounds: a peer that announced to our own node
                    # is dialed at once (a leecher that found us first)
                    new = [a for a in self.node.stored_peers(torrent.info_hash)
                           if a not in offered]
                    offered.update(new)
                    torrent.offer_peers(new, "dht")
            # until the first announce, look often: it goes out as soon as the
            # bootstrap lookup has given the node someone to ask
            await trio.sleep(WATCH_INTERVAL if announced else FIRST_WATCH)

    async def announce(self, torrent: "Torrent") -> int:
        """One get_peers + announce_peer round for ``torrent``; the peers
        found are offered to it as they arrive.  Returns how many."""
        try:
            search = self.node.announce_search(torrent.info_hash)
        except trio.ClosedResourceError:
            return 0
        self.counters["announces"] += 1
        torrent.counters["dht.announces"] += 1
        found = torrent.offer_peers(self.node.stored_peers(torrent.info_hash), "dht")
        async for addr in search:
            if self._gone(torrent) or torrent.private:
                break
            found += torrent.offer_peers([addr], "dht")
        self.counters["peers_found"] += found
        return found

    async def follow_external_address(self) -> None:
        """Keep the node's id a BEP 42 id of the Endpoint's winning external
        address (all sources' votes, not only the DHT's)."""
        last = None
        ep = self.session.endpoint
        while True:
            addr = getattr(ep, "external_address", None)
            if addr is not None and addr[0] != last:
                last = addr[0]
                self.node.adopt_external_address(str(addr[0]))
            await trio.sleep(EXTERNAL_CHECK)
