"""The two shapes of a sans-I/O protocol core, written once.

Every protocol in utpkit is a *core* that never reads a clock, draws
unseeded randomness or touches a socket (STYLE.md), and a *driver* (trio)
that feeds it.  There are two kinds, after aioquic and h11:

- a :class:`DatagramCore` speaks over datagrams to many addresses (the
  DHT's KRPC, a BEP 15 tracker);
- a :class:`StreamCore` speaks over one reliable byte stream (the
  BitTorrent peer wire, MSE, the extension protocols).

Each core takes a required ``random.Random`` (``rng``) for everything
random, so a seeded run is reproducible, and reports what happened as
:class:`Event` objects from ``next_event()``.  Drivers are written against
these Protocols, not against a concrete core, so one driver loop serves
every core of a kind.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol, runtime_checkable

__all__ = ["Event", "DatagramCore", "StreamCore", "Address", "StrEnum"]

#: A socket address as the socket module spells it: ``(host, port)``, or
#: ``(host, port, flowinfo, scope_id)`` for IPv6.
Address = tuple[Any, ...]


class StrEnum(str, enum.Enum):
    """An Enum whose members are their string values (``enum.StrEnum`` of
    Python 3.11, here for 3.10 too): states and kinds that used to be plain
    strings compare, print and serialise (JSON) as before."""

    def __str__(self) -> str:
        return str.__str__(self)

    def __format__(self, spec: str) -> str:
        return str.__format__(str.__str__(self), spec)


class Event:
    """Base of every event a core returns from ``next_event()``.

    Each package has its own subclass (``dht.Event``, ``tracker.Event``),
    and each concrete event is a frozen dataclass of that subclass, so a
    driver can dispatch with ``isinstance`` or ``match``."""

    __slots__ = ()


@runtime_checkable
class DatagramCore(Protocol):
    """A sans-I/O core that exchanges datagrams with many addresses.

    Three inputs -- datagrams, the timer, user calls (each core's own
    methods, taking ``now``) -- and two outputs, drained after every input::

        core.receive_datagram(data, addr, now)     # or core.handle_timer(now)
        for data, addr in core.datagrams_to_send(now): sock.sendto(data, addr)
        while (event := core.next_event()) is not None: ...
        sleep until core.get_timer() (None: until the next input)

    ``now`` is seconds on any monotonic clock the driver chooses (trio's,
    or a simulation's); the core only compares and adds.
    """

    def receive_datagram(self, data: bytes, addr: Address, now: float) -> None:
        """Handle one datagram from ``addr``.  Malformed or unexpected input
        is dropped and counted (or answered as the protocol says), never
        raised: it is the network's, not the caller's, mistake."""
        ...

    def datagrams_to_send(self, now: float) -> list[tuple[bytes, Address]]:
        """Remove and return the datagrams to send, in order, each with its
        destination."""
        ...

    def get_timer(self) -> float | None:
        """The time at which :meth:`handle_timer` has work to do, or None
        when nothing is pending."""
        ...

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now`` (retransmissions, timeouts,
        maintenance).  Calling it early does nothing harmful."""
        ...

    def next_event(self) -> Event | None:
        """Remove and return the oldest event, or None when there is none."""
        ...


@runtime_checkable
class StreamCore(Protocol):
    """A sans-I/O core over one reliable, ordered byte stream (h11's shape).

    The driver feeds what the stream delivered into :meth:`receive_data`
    (``b""`` for end of stream), reads events, hands the application's
    requests to :meth:`send` as events, writes :meth:`data_to_send` to the
    stream, and runs :meth:`handle_timer` when :meth:`get_timer` says.
    """

    def receive_data(self, data: bytes, now: float) -> None:
        """Bytes from the peer, in order; ``b""`` means the peer closed.
        A violation raises (or is recorded as) RemoteProtocolError."""
        ...

    def next_event(self) -> Event | None:
        """Remove and return the oldest event, or None when there is none."""
        ...

    def send(self, event: Event) -> None:
        """Queue ``event`` for the peer; LocalProtocolError when it cannot be
        sent in the current state."""
        ...

    def data_to_send(self) -> bytes:
        """Remove and return the bytes to write to the stream."""
        ...

    def get_timer(self) -> float | None:
        """The time at which :meth:`handle_timer` has work to do, or None."""
        ...

    def handle_timer(self, now: float) -> None:
        """Run what is due at ``now`` (keepalives, timeouts)."""
        ...
