"""_utpkit -- what every utpkit package shares, written once (internal).

- :mod:`_utpkit.contract`: the two core Protocols (:class:`DatagramCore`,
  :class:`StreamCore`) and the :class:`Event` base;
- :mod:`_utpkit.errors`: :class:`ProtocolError`, :class:`LocalProtocolError`,
  :class:`RemoteProtocolError`;
- :mod:`_utpkit.bencode`: strict bencode (BEP 3) with an encoder;
- :mod:`_utpkit.excgroup`: exception groups unwrapped by type;
- :mod:`_utpkit.addr`: IPv4-mapped normalisation, ``HOST:PORT`` parsing.

Not a public API: the packages (utp, dht, tracker, ucat, bt) re-export what
their users need.  It imports neither trio nor the compiled engine.
"""

from .contract import Address, DatagramCore, Event, StreamCore
from .errors import LocalProtocolError, ProtocolError, RemoteProtocolError

__all__ = ["Address", "DatagramCore", "StreamCore", "Event", "ProtocolError",
           "LocalProtocolError", "RemoteProtocolError"]
