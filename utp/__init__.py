"""utp -- uTP (BEP 29, the Micro Transport Protocol) for trio.

What it is:

- a trio transport: :func:`open_endpoint` binds one UDP socket and runs an
  :class:`Endpoint` on it; :meth:`Endpoint.connect` (with timeout-retry) and
  :meth:`Endpoint.listen` give :class:`UTPStream` objects, which are
  :class:`trio.abc.HalfCloseableStream`; :func:`open_utp_stream` and
  :func:`serve_utp` mirror :func:`trio.open_tcp_stream` and
  :func:`trio.serve_tcp`.  The same socket carries DHT and UDP tracker
  datagrams for other packages (:meth:`Endpoint.datagram_queue`,
  :meth:`Endpoint.sendto`).
- underneath, the sans-I/O uTP engine written in C for this project
  (``utp/core``, with a libutp-compatible C API) and its Cython binding:
  :class:`Context` holds the connections of one UDP port, :class:`Socket` is
  one connection; the engine's constants are grouped in IntEnums
  (:class:`Option`, :class:`ErrorCode`, ...; :mod:`utp.constants`).
- :mod:`utp.testing`: several engines over a seeded, simulated network on a
  virtual clock.
- :func:`punch` connects two peers behind NATs that call it at the same
  time; :func:`rendezvous` finds the peer by a shared key, at a UDP tracker
  (package ``tracker``) or in the Mainline DHT (package ``dht``), and then
  punches.

What it is not: a BitTorrent peer (package ``bt``, coming).
"""

from typing import Any

from utp._utp import (DEFAULT_MTU_IPV4, DEFAULT_MTU_IPV6, ERROR_NAMES, ClosedError, Context,
                      EventKind, Socket, classify)

from . import constants
from ._api import open_endpoint, open_utp_stream, run_endpoint, serve_utp
from ._endpoint import DatagramQueue, Endpoint
from ._errors import UTPError
from ._punch import punch
from ._rendezvous import rendezvous
from ._stream import UTPListener, UTPStream
from .constants import DatagramClass, ErrorCode, Option, SocketState, State

__version__ = "0.1.0"

__all__ = [
    # the binding (see utp/_utp.pyi)
    "Context", "Socket", "ClosedError", "classify", "EventKind", "ERROR_NAMES",
    "DEFAULT_MTU_IPV4", "DEFAULT_MTU_IPV6",
    # the engine's constants, grouped (utp/constants.py)
    "Option", "ErrorCode", "State", "SocketState", "DatagramClass", "constants",
    # the trio layer
    "open_endpoint", "open_utp_stream", "serve_utp", "run_endpoint", "Endpoint",
    "DatagramQueue", "UTPStream", "UTPListener", "UTPError", "punch", "rendezvous", "__version__",
]


def __getattr__(name: str) -> Any:
    # The C names of utp.h (UTP_SNDBUF, UTPKIT_MIN_RTO, ...) stay attributes
    # of utp, for code that mirrors libutp, outside __all__ (utp/constants.py).
    if name in constants.C_NAMES:
        return getattr(constants, name)
    raise AttributeError(f"module 'utp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(constants.C_NAMES))
