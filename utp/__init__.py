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
  time (:func:`is_initiator` says which side sends the SYNs);
  :func:`rendezvous` finds the peer by a shared key (:func:`info_hash_for`
  is the hash both announce), at a UDP tracker (package ``tracker``) or in
  the Mainline DHT (package ``dht``), and then punches; it raises
  :class:`RendezvousError` when the meeting itself fails.  A symmetric NAT
  facing a port-restricted one connects by birthday probing (caps:
  :class:`BirthdayLimits`); two symmetric NATs fail with
  :class:`NATTraversalError` (or a TimeoutError that says so).
- :func:`port_mapping` asks the gateway to forward a public port to the
  Endpoint (PCP, NAT-PMP or UPnP IGD), renews it and removes it on exit.

What it is not: a BitTorrent peer (package ``bt``, coming).
"""

from typing import Any

import os as _os


def _missing_extension(exc: ImportError) -> ImportError:
    """The error for a utp without its compiled module.  The usual cause:
    Python found the source checkout before the installed package, because
    ``python -m ...`` and scripts put their own directory first on sys.path;
    the source tree has no compiled ``utp._utp`` unless built in place."""
    here = _os.path.dirname(_os.path.abspath(__file__))
    root = _os.path.dirname(here)
    in_checkout = all(_os.path.exists(_os.path.join(root, f))
                      for f in ("pyproject.toml", "setup.py", "utp/_utp.pyx"))
    if not in_checkout:
        return ImportError(f"utp's compiled module utp._utp is missing from {here}: "
                           f"the installation is broken; reinstall utpkit ({exc})",
                           name="utp._utp")
    import glob
    import sys

    installed = [p for p in sys.path if _os.path.abspath(p or _os.curdir) != root
                 and glob.glob(_os.path.join(p, "utp", "_utp*.so"))]
    if installed:
        where = (f": the current directory (or the script's) comes first on sys.path, so it "
                 f"hides the installed utpkit in {installed[0]}. Use the installed commands "
                 f"(.venv/bin/utp-demo, .venv/bin/utp-bench, .venv/bin/ucat, .venv/bin/dht), "
                 f"run Python from another directory")
    else:
        where = (f", and utpkit is not installed for {sys.executable}. Install it "
                 f"(python3 -m venv .venv && .venv/bin/pip install .) and use its commands "
                 f"(.venv/bin/utp-demo, .venv/bin/ucat, ...)")
    return ImportError(
        f"utp was imported from the source checkout {root}, which has no compiled "
        f"utp._utp{where}, or build in place for working on the source: "
        f".venv/bin/pip install -e .", name="utp._utp")



try:
    from utp._utp import (DEFAULT_MTU_IPV4, DEFAULT_MTU_IPV6, ERROR_NAMES, ClosedError, Context,
                          EventKind, Socket, classify)
except ModuleNotFoundError as _exc:
    if _exc.name != "utp._utp":
        raise
    raise _missing_extension(_exc) from None

from . import constants
from ._api import open_endpoint, open_utp_stream, run_endpoint, serve_utp
from ._endpoint import DatagramQueue, Endpoint
from ._errors import UTPError
from _utpkit.errors import NetworkError
from ._birthday import BirthdayLimits, NATTraversalError
from ._portmap import PortMapping, PortMappingError, port_mapping
from ._punch import is_initiator, punch
from ._rendezvous import RendezvousError, info_hash_for, rendezvous
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
    "DatagramQueue", "UTPStream", "UTPListener", "UTPError", "NetworkError", "punch", "rendezvous", "__version__",
    # named by punch()'s and rendezvous()'s docstrings
    "is_initiator", "RendezvousError", "info_hash_for", "BirthdayLimits", "NATTraversalError",
    # port mapping at the gateway (PCP, NAT-PMP, UPnP IGD)
    "port_mapping", "PortMapping", "PortMappingError",
]


def __getattr__(name: str) -> Any:
    # The C names of utp.h (UTP_SNDBUF, UTPKIT_MIN_RTO, ...) stay attributes
    # of utp, for code that mirrors libutp, outside __all__ (utp/constants.py).
    if name in constants.C_NAMES:
        return getattr(constants, name)
    raise AttributeError(f"module 'utp' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(constants.C_NAMES))
