"""BitTorrent peer for utpkit -- under construction: the sans-I/O building
blocks exist, the peer that uses them does not yet.

What exists (pure Python, no trio, no sockets, no clock):

- :mod:`bt.wire`: the stateless peer-wire codec -- every BEP 3 message,
  ``port`` (BEP 5), the Fast Extension (BEP 6), the extension protocol and
  its handshake (BEP 10), the 68-byte handshake and its reserved bits, and
  BEP 6's allowed-fast set;
- :mod:`bt.peerwire`: :class:`PeerWire`, one connection's protocol core
  (h11's shape: ``receive_data(data, now)``, ``next_event()``,
  ``send(event)``, ``data_to_send()``, ``get_timer()``, ``handle_timer``),
  which disconnects a misbehaving peer with a counted :class:`Violation`;
- :mod:`bt.picker` (rarest-first piece picker, end game, sequential mode,
  request pipelining depth), :mod:`bt.choker` (tit-for-tat, optimistic
  unchoke, anti-snubbing), :mod:`bt.ratelimit` (token bucket): pure policy;
- :mod:`bt.swarmsim`: a seeded swarm on a virtual clock driving them.

Not written yet: the trio drivers (session, torrent, peer connections over
TCP and uTP), trackers for torrents, the CLI, events and RPC, MSE and the
extensions (ut_metadata, ut_pex, ut_holepunch).  It is not a client UI.
"""

from .peerwire import ConnState, ConnectionClosed, PeerWire, RequestsDropped
from .wire import Event, Geometry, Violation, WireError

__all__ = ["Event", "Geometry", "Violation", "WireError", "PeerWire", "ConnState",
           "ConnectionClosed", "RequestsDropped"]
