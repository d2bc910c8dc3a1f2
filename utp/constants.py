"""The engine's constants, grouped.

``utp/core/utp.h`` is source-compatible with libutp's ``utp.h``, and the
binding (:mod:`utp._utp`) exposes every one of its constants under its C
name (``UTP_SNDBUF``, ``UTPKIT_MIN_RTO``, ...), so code ported from libutp
reads the same.  Python code should use the groups instead:

- :class:`Option`: ``Context.set_option`` / ``Socket.get_option`` ids;
- :class:`ErrorCode`: the codes of ``"error"`` events and
  :attr:`utp.UTPError.code`;
- :class:`State`: libutp's ``UTP_STATE_*`` state-change kinds;
- :class:`SocketState`: ``Socket.info()["state"]``;
- :class:`DatagramClass`: what :func:`utp.classify` says a datagram is.

Where the names live (decided in issue 15): the C names stay importable
from :mod:`utp._utp`, from this module and, for compatibility, as
attributes of :mod:`utp` (``utp.UTP_SNDBUF``), but they are not in
``utp.__all__``: ``from utp import *`` brings the groups, not 53 loose
integers.  Every member is an ``IntEnum``, so it is the same integer the C
name is and either can be passed where the other was.
"""

from __future__ import annotations

import enum

from . import _utp
from ._utp import __all__ as _binding_all

__all__ = ["Option", "ErrorCode", "State", "SocketState", "DatagramClass", "C_NAMES"]

#: Every C name of utp.h the binding exposes (``UTP_*`` and ``UTPKIT_*``).
C_NAMES: tuple[str, ...] = tuple(n for n in _binding_all if n.startswith(("UTP_", "UTPKIT_")))

globals().update({name: getattr(_utp, name) for name in C_NAMES})


class Option(enum.IntEnum):
    """Engine option ids (``Context.set_option``, ``Socket.get_option``)."""
    LOG_NORMAL = _utp.UTP_LOG_NORMAL
    LOG_MTU = _utp.UTP_LOG_MTU
    LOG_DEBUG = _utp.UTP_LOG_DEBUG
    SNDBUF = _utp.UTP_SNDBUF
    RCVBUF = _utp.UTP_RCVBUF
    TARGET_DELAY = _utp.UTP_TARGET_DELAY
    MIN_RTO = _utp.UTPKIT_MIN_RTO
    MAX_RTO = _utp.UTPKIT_MAX_RTO
    MAX_SOCKETS = _utp.UTPKIT_MAX_SOCKETS
    SYN_TIMEOUT = _utp.UTPKIT_SYN_TIMEOUT
    SYN_RETRIES = _utp.UTPKIT_SYN_RETRIES
    ACK_DELAY = _utp.UTPKIT_ACK_DELAY
    KEEPALIVE = _utp.UTPKIT_KEEPALIVE
    DEAD_RETRIES = _utp.UTPKIT_DEAD_RETRIES
    RESET_RATE = _utp.UTPKIT_RESET_RATE
    MTU_PROBING = _utp.UTPKIT_MTU_PROBING
    HALF_OPEN_MAX = _utp.UTPKIT_HALF_OPEN_MAX
    HALF_OPEN_PER_ADDR = _utp.UTPKIT_HALF_OPEN_PER_ADDR
    SYNACK_RATE = _utp.UTPKIT_SYNACK_RATE


class ErrorCode(enum.IntEnum):
    """Why a connection failed (libutp's ``UTP_E*``)."""
    CONNREFUSED = _utp.UTP_ECONNREFUSED
    CONNRESET = _utp.UTP_ECONNRESET
    TIMEDOUT = _utp.UTP_ETIMEDOUT


class State(enum.IntEnum):
    """libutp's state-change kinds (``UTP_STATE_*``)."""
    CONNECT = _utp.UTP_STATE_CONNECT
    WRITABLE = _utp.UTP_STATE_WRITABLE
    EOF = _utp.UTP_STATE_EOF
    DESTROYING = _utp.UTP_STATE_DESTROYING


class SocketState(enum.IntEnum):
    """An engine socket's state (``UTPKIT_SOCK_*``)."""
    IDLE = _utp.UTPKIT_SOCK_IDLE
    SYN_SENT = _utp.UTPKIT_SOCK_SYN_SENT
    CONNECTED = _utp.UTPKIT_SOCK_CONNECTED
    ERROR = _utp.UTPKIT_SOCK_ERROR
    CLOSING = _utp.UTPKIT_SOCK_CLOSING
    DESTROYED = _utp.UTPKIT_SOCK_DESTROYED


class DatagramClass(enum.IntEnum):
    """What the demultiplexer makes of a datagram (:func:`utp.classify`)."""
    OTHER = _utp.UTPKIT_CLASS_OTHER
    UTP = _utp.UTPKIT_CLASS_UTP
    DHT = _utp.UTPKIT_CLASS_DHT
    TRACKER = _utp.UTPKIT_CLASS_TRACKER
