"""utp -- uTP (BEP 29, the Micro Transport Protocol) for Python.

What it is: the sans-I/O uTP engine written in C for this project
(utp/core), and its Cython binding: a ``Context`` holds the connections of one
UDP port and a ``Socket`` is one connection.  The caller moves the datagrams
(``process_udp()`` in, ``take_datagrams()`` out), drives the timers
(``next_timeout()``, ``check_timeouts()``, ``issue_deferred_acks()``) and acts
on ``take_events()``.  ``utp.testing`` runs several engines over a seeded,
simulated network on a virtual clock; ``python -m utp.demo`` shows it.

What it is not (yet): it opens no sockets and runs no event loop.  The trio
layer -- an ``Endpoint`` that owns one UDP socket shared with the DHT and
tracker traffic, trio streams and listeners, NAT hole punching -- comes later
on top of this binding.
"""

# Context, Socket, ClosedError, classify, ERROR_NAMES, DEFAULT_MTU_IPV4/6 and
# every UTP_* / UTPKIT_* constant of utp.h (see utp/_utp.pyi).
from utp._utp import *  # noqa: F401,F403
from utp._utp import __all__  # noqa: F401
