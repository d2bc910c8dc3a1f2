"""dht -- the Mainline DHT (BEP 5) for utpkit, on the shared uTP socket.

What it is:

- ``async with dht.open_node(endpoint, bootstrap=[...]) as node:`` -- a
  node on a :class:`utp.Endpoint`'s shared socket (``dht/_node.py``, the
  only module that imports trio): ``node.get_peers(ih)`` (async iterator of
  peers), ``node.announce(ih, port=None)`` (implied port),
  ``node.find_node(id)``, ``node.ping(addr)``, ``node.statistics()``,
  ``node.external_address``.

- a sans-I/O KRPC node, :class:`DHTCore` (``dht/_core.py``): datagrams and
  ``now`` in, datagrams and events out, randomness from an injected
  ``random.Random``.  Queries ping, find_node, get_peers and announce_peer
  (with ``implied_port``), errors 201-204 as BEP 5; ``v``; ``ro`` (BEP 43);
  IPv6 with ``nodes6`` and ``want`` (BEP 32); the ``ip`` field and secure
  node ids (BEP 42, enforcement optional, local addresses exempt); votes on
  our external address; per-source rate limits; responses at most 4x the
  size of their request (8x with ``want`` n4+n6).
- the routing table (``dht/_table.py``): k=8 buckets split only around our
  own id, good/questionable/bad nodes, replacement cache, bucket refresh,
  save/load to a JSON file; tokens; a bounded, expiring peer store.
- iterative lookups: alpha=3, closest-k termination, per-query timeout with
  one resend (a slow node stops holding a slot after the first timeout).
- :mod:`dht.sim`: hundreds of cores on a virtual clock, for tests and
  ``python -m dht.bench``.

What it is not: a general key-value store (no BEP 44 put/get), and it never
contacts a node the user did not name: there are no default bootstrap
nodes.

Bencode: our own strict decoder (``_utpkit/bencode.py``, shared with the
tracker and the BitTorrent peer), not a PyPI library.
A KRPC datagram is attacker-controlled; the decoder accepts only canonical
bencode (no leading zeros, no ``-0``, sorted unique keys, no trailing
bytes), bounds depth and size, raises one exception type, and is ~150 lines
with no dependency -- cheaper to audit and fuzz (tests/test_dht_core.py)
than to vet a third-party decoder's failure modes on malformed input.
"""

from _utpkit.bencode import BencodeError, decode_untrusted, encode
from _utpkit.errors import LocalProtocolError, ProtocolError, RemoteProtocolError

from ._core import (DHTCore, Event, ExternalAddressChanged, LookupDone, LookupKind, PeersFound,
                    PingDone)
from ._node import DHTAnnounceResult, DHTNode, PeerSearch, open_node
from ._node import AnnounceResult  # noqa: F401  (deprecated name of DHTAnnounceResult)
from ._wire import KRPCError
from ._table import AddressVotes, PeerStore, RoutingTable

__all__ = [
    "open_node", "DHTNode", "PeerSearch", "DHTAnnounceResult",
    "DHTCore", "Event", "PeersFound", "LookupDone", "LookupKind", "PingDone",
    "ExternalAddressChanged", "AddressVotes", "PeerStore", "RoutingTable", "encode",
    "decode_untrusted", "BencodeError", "ProtocolError", "LocalProtocolError",
    "RemoteProtocolError", "KRPCError",
]
