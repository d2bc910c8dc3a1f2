"""The Endpoint: one UDP socket, one receive task, a demultiplexer, the timers.

Everything utpkit does shares one UDP port.  Each datagram has one owner,
decided in C from its first bytes (DESIGN.md, "The demultiplexer"): uTP
packets go straight into the engine without creating Python objects; DHT
(bencoded ``d...``) and UDP tracker datagrams go to bounded queues that other
packages register; anything else is counted and dropped, or handed to a
registered fallback queue.

Python runs once per received batch, not per packet: the receive task wakes
when the socket is readable, the binding drains it with ``recvmmsg`` and
feeds the engine, and only then does Python look at what changed (events
for streams, datagrams for other owners) and flush the engine's output with
``sendmmsg``.  A timer task sleeps exactly until the engine's next deadline.

The same Endpoint runs over a simulated network (:mod:`utp.testing`) under
trio's ``MockClock``: the I/O sits behind a small driver interface, and in
that mode the engine's clock is trio's.

The seams other modules use (streams, the listener, connect, punch, the DHT
and tracker drivers) are the Endpoint's public methods, each documented:
opening an engine socket (:meth:`Endpoint.open_engine_socket`), bracketing
engine calls (:meth:`Endpoint.before_engine_call`,
:meth:`Endpoint.after_engine_call`), datagram queues
(:meth:`Endpoint.datagram_queue`, :meth:`Endpoint.release_datagram_queue`),
accepting (:meth:`Endpoint.update_admission`, :meth:`Endpoint.claim_incoming`), waiting for room in a send
buffer (:meth:`Endpoint.watch_send_room`), ICMP port unreachable reports
for DHT and tracker traffic (:meth:`Endpoint.port_unreachable`,
:meth:`Endpoint.wait_port_unreachable`) and the lifecycle
(:meth:`Endpoint.run`, :meth:`Endpoint.shutdown`, :meth:`Endpoint.close_now`).
Nothing outside this module touches an underscore member of an Endpoint
(tests/test_contract.py checks).
"""

from __future__ import annotations

import collections
import errno
import math
import socket as _socket
from typing import Any, Callable, Deque, Protocol

import trio

from _utpkit.addr import addr_key

from . import _utp
from ._connect import connect_with_retry
from ._punch import punch as _punch
from ._stream import UTPListener, UTPStream
from ._utp import EventKind

__all__ = ["Endpoint", "DatagramQueue", "Driver", "UDPDriver", "OWNER_DHT", "OWNER_TRACKER",
           "OWNER_OTHER"]

_ACCEPT, _DESTROYED = EventKind.ACCEPT, EventKind.DESTROYED   # per-event dispatch

OWNER_DHT = "dht"
OWNER_TRACKER = "tracker"
OWNER_OTHER = "other"
_CLASS_OWNER = {
    _utp.UTPKIT_CLASS_DHT: OWNER_DHT,
    _utp.UTPKIT_CLASS_TRACKER: OWNER_TRACKER,
    _utp.UTPKIT_CLASS_OTHER: OWNER_OTHER,
}


class Driver(Protocol):
    """Moves datagrams between the engine and a network.

    ``UDPDriver`` is the real one (a non-blocking UDP socket and the
    binding's batched syscalls); :mod:`utp.testing` provides a simulated one.
    """

    local_address: tuple[Any, ...]
    virtual_time: bool

    async def wait_readable(self) -> None: ...
    def receive(self, ctx: _utp.Context) -> int: ...
    def flush(self, ctx: _utp.Context) -> int: ...
    async def wait_writable(self) -> None: ...
    def take_other(self, ctx: _utp.Context) -> list[tuple[int, bytes, Any]]: ...
    def sendto(self, ctx: _utp.Context, data: bytes, addr: Any) -> None: ...
    def statistics(self, ctx: _utp.Context) -> dict[str, Any]: ...
    def close(self) -> None: ...


class UDPDriver:
    """A real, non-blocking UDP socket driven by the binding's batched
    ``recvmmsg`` / ``sendmmsg`` hot path."""

    virtual_time = False

    def __init__(self, sock: trio.socket.SocketType, ctx: _utp.Context, *,
                 socket_buffer: int | None = None) -> None:
        self.sock = sock
        self.fd = sock.fileno()
        self.buffers = ctx.setup_socket(self.fd, rcvbuf=socket_buffer, sndbuf=socket_buffer)
        self.local_address = sock.getsockname()

    async def wait_readable(self) -> None:
        await trio.lowlevel.wait_readable(self.sock)

    def receive(self, ctx: _utp.Context) -> int:
        return ctx.recv_batch(self.fd)

    def flush(self, ctx: _utp.Context) -> int:
        return ctx.send_batch(self.fd)

    async def wait_writable(self) -> None:
        await trio.lowlevel.wait_writable(self.sock)

    def take_other(self, ctx: _utp.Context) -> list[tuple[int, bytes, Any]]:
        return ctx.take_other()

    def take_unreachable(self, ctx: _utp.Context) -> list[Any]:
        return ctx.take_unreachable()

    def sendto(self, ctx: _utp.Context, data: bytes, addr: Any) -> None:
        ctx.sendto(self.fd, data, addr)

    def sendto_with_ttl(self, ctx: _utp.Context, data: bytes, addr: Any, ttl: int) -> bool:
        """Send one datagram with IP TTL (IPv6 hop limit) ``ttl``; True when
        the kernel took it.  The socket's TTL is set around this one send
        and restored, and the engine's queue is flushed first, so no other
        datagram leaves with it; when the queue cannot be flushed (a full
        socket buffer) or the send would block, nothing is sent: a datagram
        with a small TTL must never leave later with the default one."""
        if ctx.send_batch(self.fd):
            return False
        raw = self.sock._sock
        opts = [(_socket.IPPROTO_IP, _socket.IP_TTL)]
        if raw.family == _socket.AF_INET6:
            opts.append((_socket.IPPROTO_IPV6, _socket.IPV6_UNICAST_HOPS))
            if ":" not in str(addr[0]):
                addr = ("::ffff:" + str(addr[0]), int(addr[1]))
        saved = []
        try:
            for level, opt in opts:
                saved.append((level, opt, raw.getsockopt(level, opt)))
                raw.setsockopt(level, opt, ttl)
            raw.sendto(data, addr)
            return True
        except OSError:
            return False
        finally:
            for level, opt, value in saved:
                raw.setsockopt(level, opt, value)

    def statistics(self, ctx: _utp.Context) -> dict[str, Any]:
        return {"socket_buffers": dict(self.buffers), "io": ctx.io_stats()}

    def close(self) -> None:
        self.sock.close()


class DatagramQueue:
    """A bounded queue of ``(data, address)`` datagrams for one owner of the
    shared socket (the DHT, the tracker client, a fallback).  When it is full
    new datagrams are dropped and counted, never buffered without bound.

    Async-iterable; ``await receive()`` waits for the next datagram.
    """

    def __init__(self, owner: str, maxlen: int) -> None:
        if maxlen < 1:
            raise ValueError("maxlen must be at least 1")
        self.owner = owner
        self.maxlen = maxlen
        self._items: Deque[tuple[bytes, Any]] = collections.deque()
        self._lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self.received = 0
        self.dropped = 0
        self.bytes = 0

    def _put(self, data: bytes, addr: Any) -> None:
        if self._closed or len(self._items) >= self.maxlen:
            self.dropped += 1
            return
        self.received += 1
        self.bytes += len(data)
        self._items.append((data, addr))
        self._lot.unpark()

    def receive_nowait(self) -> tuple[bytes, Any]:
        """The next datagram; raises trio.WouldBlock when there is none."""
        if self._items:
            return self._items.popleft()
        if self._closed:
            raise trio.ClosedResourceError(f"the {self.owner} queue is closed")
        raise trio.WouldBlock

    async def receive(self) -> tuple[bytes, Any]:
        """Wait for the next ``(data, address)``.

        Raises ClosedResourceError once the queue (or its Endpoint) is closed
        and empty."""
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                item = self.receive_nowait()
            except trio.WouldBlock:
                await self._lot.park()
                continue
            await trio.lowlevel.cancel_shielded_checkpoint()
            return item

    def close(self) -> None:
        self._closed = True
        self._lot.unpark_all()

    def __aiter__(self) -> DatagramQueue:
        return self

    async def __anext__(self) -> tuple[bytes, Any]:
        try:
            return await self.receive()
        except trio.ClosedResourceError:
            raise StopAsyncIteration from None

    def statistics(self) -> dict[str, int]:
        return {"queued": len(self._items), "maxlen": self.maxlen, "received": self.received,
                "dropped": self.dropped, "bytes": self.bytes}


class ExternalAddressVotes:
    """What others say our public ``(ip, port)`` is.

    DHT responses (BEP 42 ``ip``), UDP trackers and BitTorrent's ``yourip``
    all report the address they see us at -- through a NAT, the mapping of
    this very socket.  Each reporting IP has one vote (its latest), so a
    single peer cannot stuff the ballot; at most ``limit`` reporters are
    remembered (the oldest are forgotten).  The winner is the address with
    the most votes, the most recent one on a tie."""

    def __init__(self, limit: int = 256) -> None:
        self.limit = limit
        self._by_reporter: collections.OrderedDict[Any, tuple[Any, str]] = collections.OrderedDict()
        self.total = 0

    def vote(self, addr: tuple[Any, ...], reporter: Any, source: str) -> None:
        key = reporter[0] if isinstance(reporter, tuple) else reporter
        self._by_reporter.pop(key, None)
        self._by_reporter[key] = (tuple(addr[:2]), source)
        self.total += 1
        while len(self._by_reporter) > self.limit:
            self._by_reporter.popitem(last=False)

    @property
    def winner(self) -> tuple[Any, ...] | None:
        counts: dict[Any, int] = collections.Counter()
        last: dict[Any, int] = {}
        for i, (addr, _) in enumerate(self._by_reporter.values()):
            counts[addr] += 1
            last[addr] = i
        if not counts:
            return None
        return max(counts, key=lambda a: (counts[a], last[a]))

    def addresses(self) -> list[tuple[Any, ...]]:
        """Every address some reporter currently says is ours, oldest
        report first (repeats included)."""
        return [addr for addr, _ in self._by_reporter.values()]

    def statistics(self) -> dict[str, Any]:
        sources = collections.Counter(src for _, src in self._by_reporter.values())
        return {"winner": self.winner, "reporters": len(self._by_reporter), "votes": self.total,
                "by_source": dict(sources)}


class Endpoint:
    """One UDP socket carrying uTP connections and other datagram traffic.

    Create it with :func:`utp.open_endpoint`.  Connections come from
    :meth:`connect` (outgoing) and :meth:`listen` (incoming); other packages
    register for their datagrams with :meth:`datagram_queue` and send with
    :meth:`sendto`.

    Resource handling: the Endpoint's tasks live in the nursery that
    :func:`utp.open_endpoint` opens; leaving that block closes every
    connection (gracefully, up to ``linger`` seconds) and the socket.
    """

    def __init__(self, driver: Driver, ctx: _utp.Context, *, recv_buffer: int | None,
                 send_buffer: int | None, linger: float) -> None:
        self._driver = driver
        self._ctx = ctx
        self._virtual = driver.virtual_time
        self.recv_buffer = recv_buffer
        self.send_buffer = send_buffer
        # Context-wide defaults: accepted sockets get them at creation, so
        # even the SYN-ACK advertises the right window.
        if recv_buffer is not None:
            ctx.set_option(_utp.UTP_RCVBUF, recv_buffer)
        if send_buffer is not None:
            ctx.set_option(_utp.UTP_SNDBUF, send_buffer)
        self.linger = linger
        self._streams: dict[_utp.Socket, UTPStream] = {}
        # Streams with a task in wait_send_all_might_not_block().
        self._room_waiters: set[UTPStream] = set()
        self._listener: UTPListener | None = None
        # Listeners of claim_incoming(), first match wins; and the SYNs that
        # no listener took while claims made Python decide.
        self._claims: list[UTPListener] = []
        self._refused_unclaimed = 0
        self._queues: dict[str, DatagramQueue] = {}
        self._unowned: dict[str, int] = collections.defaultdict(int)
        self._timer_scope: trio.CancelScope | None = None
        self._send_blocked = False
        self._send_unblocked = trio.lowlevel.ParkingLot()
        self._writer_lot = trio.lowlevel.ParkingLot()
        # Woken when the last stream is destroyed (shutdown waits on it) and
        # after every round of engine work (wait_engine_progress).
        self._drained_lot = trio.lowlevel.ParkingLot()
        self._progress_lot = trio.lowlevel.ParkingLot()
        self._closed = False
        self._failure: BaseException | None = None
        self._batches = 0
        self._votes = ExternalAddressVotes()
        self._mapped: tuple[Any, ...] | None = None
        # ICMP port unreachable from DHT/tracker destinations: address key
        # -> trio time of the latest report (bounded, oldest dropped).
        self._unreachable: dict[tuple[Any, int], float] = {}
        self._unreachable_lot = trio.lowlevel.ParkingLot()

    # ---- public -----------------------------------------------------------------

    @property
    def local_address(self) -> tuple[Any, ...]:
        """The address the UDP socket is bound to."""
        return self._driver.local_address

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def simulated(self) -> bool:
        """Whether this Endpoint runs over a simulated network
        (:mod:`utp.testing`) on trio's clock, not a real UDP socket: what
        needs more real sockets (birthday probing) stays off there."""
        return self._virtual

    @property
    def external_address(self) -> tuple[Any, ...] | None:
        """Our public ``(ip, port)``: the gateway's port mapping while one
        is held (:func:`utp.port_mapping`), else as others report it (the
        winner of :meth:`vote_external_address`), or None before any
        report."""
        if self._mapped is not None:
            return self._mapped
        return self._votes.winner

    def set_mapped_address(self, addr: tuple[Any, ...] | None) -> None:
        """The public address a port mapping at our gateway forwards to
        this Endpoint (None: no mapping).  It outranks peers' votes: the
        gateway knows, peers only see."""
        self._mapped = tuple(addr[:2]) if addr is not None else None

    def vote_external_address(self, addr: tuple[Any, ...], *, reporter: Any,
                              source: str = "unknown") -> None:
        """Record that ``reporter`` (a peer's address) sees us at ``addr``;
        ``source`` says who reported it ("dht", "tracker", "bt", ...)."""
        self._votes.vote(addr, reporter, source)

    def reported_addresses(self) -> list[tuple[Any, ...]]:
        """Every address some peer currently reports as ours (not just the
        winner): a rendezvous uses them to recognise itself in a peer
        list."""
        mapped = [self._mapped] if self._mapped is not None else []
        return mapped + self._votes.addresses()

    async def connect(self, addr: tuple[Any, ...], *, attempt_timeout: float = 2.0,
                      timeout: float | None = 10.0,
                      deadline: float | None = None) -> UTPStream:
        """Open a uTP connection to ``addr`` (a ``(host, port)`` tuple with a
        literal IP address), retrying with fresh connections.

        Each attempt is a new uTP connection (new connection id) that lives
        ``attempt_timeout`` seconds; the engine resends its SYN within the
        attempt.  An attempt that times out is replaced by a new one until
        ``deadline`` (absolute, trio clock) or ``timeout`` (seconds from now)
        passes.  Behind a NAT the first SYNs open our own mapping and later
        ones get through.

        Raises ConnectionRefusedError when the peer answers with RESET (no
        listener there), TimeoutError when nothing answered in time, OSError
        for an unusable address.

        Cancellation: cancelling leaves no half-open connection behind.
        """
        return await connect_with_retry(self, addr, attempt_timeout=attempt_timeout,
                                        timeout=timeout, deadline=deadline)

    def listen(self, *, backlog: int = 128) -> UTPListener:
        """Accept incoming connections on this Endpoint (one listener per
        Endpoint).  See :class:`UTPListener`."""
        self.check_open()
        if self.listener is not None:
            raise RuntimeError("this Endpoint already has a listener")
        self._listener = UTPListener(self, backlog)
        self.update_admission()
        return self._listener

    def claim_incoming(self, match: Callable[[Any], bool], *, backlog: int = 1) -> UTPListener:
        """A listener of its own for the incoming connections whose peer
        address ``match`` accepts, taken before the Endpoint's listener
        (:meth:`listen`) sees them; that one keeps getting the others.

        This lets :func:`utp.punch` answer on an Endpoint whose application
        already listens (a server that also punches): the punch claims the
        peer's IP and leaves everything else alone.  Claims are checked in
        the order they were made, first match wins.  ``match`` is called
        for every new incoming SYN while the claim is open (before the
        engine answers it, so keep it cheap and pure; an exception counts
        as a refusal and goes to the claim's ``on_error``).  Closing the
        returned listener ends the claim.  Without any listener, claims or
        not, unmatched peers are refused (RESET)."""
        self.check_open()
        if not callable(match):
            raise TypeError(f"match must be callable, not {type(match).__name__}")
        claim = UTPListener(self, backlog, match=match)
        self._claims.append(claim)
        self.update_admission()
        return claim

    @property
    def admission_query(self) -> tuple[str, int] | None:
        """While a listener's firewall or a claim's ``match`` runs:
        ``(stage, syn_conn_id)``, what admitting the SYN would do ("syn":
        create the connection; "cookie_syn": past the engine's half-open
        bounds, answer with a stateless SYN cookie and create nothing;
        "cookie_return": the cookie came back, create it now) and which SYN
        it is.  None at any other time.  Under SYN-cookie load a connection
        is asked about twice, so a firewall admitting only one connection
        (utp.punch's) needs this (see utp._utp.Context.firewall_query)."""
        if self._ctx.closed:
            return None
        return self._ctx.firewall_query

    async def punch(self, peer: tuple[Any, ...], *, local_public: tuple[Any, ...] | None = None,
                    deadline: float | None = None, timeout: float | None = None,
                    **options: Any) -> UTPStream:
        """Hole-punch a uTP connection to ``peer`` (its public endpoint)
        from this Endpoint: :func:`utp.punch` with this Endpoint, where
        ``local_public``, ``deadline``, ``timeout`` and the other
        ``options`` (``interval``, ``hold``, ``birthday``, ``log``, ...)
        are documented.  Works whether or not the application listens
        here: the punch claims only the peer's IP (:meth:`claim_incoming`)
        and releases its datagram queue afterwards."""
        return await _punch(self, peer, local_public=local_public, deadline=deadline,
                           timeout=timeout, **options)

    @property
    def listener(self) -> UTPListener | None:
        """The Endpoint's open listener, or None."""
        listener = self._listener
        return listener if listener is not None and not listener.closed else None

    def datagram_queue(self, owner: str, *, maxlen: int = 1024) -> DatagramQueue:
        """Register for the datagrams of one owner: ``"dht"`` (bencoded
        dictionaries), ``"tracker"`` (BEP 15), or ``"other"`` (anything that
        is not uTP, DHT or tracker traffic).  Without a queue such datagrams
        are counted and dropped."""
        if owner not in (OWNER_DHT, OWNER_TRACKER, OWNER_OTHER):
            raise ValueError(f"unknown owner {owner!r}; expected 'dht', 'tracker' or 'other'")
        self.check_open()
        if owner in self._queues:
            raise RuntimeError(f"the {owner!r} datagrams already have a queue")
        q = DatagramQueue(owner, maxlen)
        self._queues[owner] = q
        return q

    def release_datagram_queue(self, queue: DatagramQueue) -> None:
        """Close ``queue`` and unregister it, so a later
        :meth:`datagram_queue` call (another punch, another tracker client)
        can take its owner's datagrams.  Releasing a queue that is no longer
        registered just closes it."""
        queue.close()
        if self._queues.get(queue.owner) is queue:
            del self._queues[queue.owner]

    async def sendto(self, data: bytes, addr: tuple[Any, ...]) -> None:
        """Send one datagram from the shared socket (for the DHT and tracker
        clients).  It leaves in order with the engine's own packets."""
        self.check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        self._driver.sendto(self._ctx, bytes(data), addr)
        self._flush()
        await trio.lowlevel.cancel_shielded_checkpoint()

    async def sendto_with_ttl(self, data: bytes, addr: tuple[Any, ...], ttl: int) -> bool:
        """Send one datagram from the shared socket with IP TTL (IPv6 hop
        limit) ``ttl``, for hole punching's NAT-opening probes (they must
        expire before the peer's NAT).  Best effort: False when it was not
        sent (the socket's buffer is full, or the network -- a simulated
        one -- cannot limit the TTL); never sent later with another TTL."""
        if not 1 <= ttl <= 255:
            raise ValueError(f"ttl must be 1..255, not {ttl!r}")
        self.check_open()
        await trio.lowlevel.checkpoint_if_cancelled()
        send = getattr(self._driver, "sendto_with_ttl", None)
        sent = bool(send(self._ctx, bytes(data), addr, ttl)) if send is not None else False
        await trio.lowlevel.cancel_shielded_checkpoint()
        return sent

    def port_unreachable(self, addr: tuple[Any, ...], *, since: float | None = None) -> bool:
        """Whether the kernel reported ICMP port unreachable for a datagram
        this Endpoint sent to ``addr`` (DHT and tracker traffic; uTP
        connections get ConnectionRefusedError themselves), at or after
        ``since`` (trio clock) if given.  Nothing listens there."""
        when = self._unreachable.get(addr_key(addr))
        return when is not None and (since is None or when >= since)

    async def wait_port_unreachable(self, addr: tuple[Any, ...], *, since: float | None = None) -> None:
        """Return when an ICMP port unreachable for ``addr`` arrives (see
        :meth:`port_unreachable`), or has arrived at or after ``since``
        (trio clock; default: now); for racing against an answer."""
        self.check_open()
        key = addr_key(addr)
        start = trio.current_time() if since is None else since
        while True:
            when = self._unreachable.get(key)
            if when is not None and when >= start:
                return
            await self._unreachable_lot.park()
            self.check_open()

    def _note_unreachable(self) -> None:
        take = getattr(self._driver, "take_unreachable", None)
        if take is None or self._ctx.closed:
            return
        found = take(self._ctx)
        if not found:
            return
        now = trio.current_time()
        for addr in found:
            try:
                key = addr_key(addr)
            except (TypeError, ValueError, IndexError):
                continue
            self._unreachable.pop(key, None)
            self._unreachable[key] = now
        while len(self._unreachable) > 256:
            del self._unreachable[next(iter(self._unreachable))]
        self._unreachable_lot.unpark_all()

    def statistics(self) -> dict[str, Any]:
        """Per-owner datagram counts and drops, engine counters, socket
        buffers and syscall counts."""
        owners = {name: q.statistics() for name, q in self._queues.items()}
        for name, n in self._unowned.items():
            owners.setdefault(name, {"received": 0, "dropped": 0})["unowned_dropped"] = n
        stats: dict[str, Any] = {
            "connections": len(self._streams),
            "batches": self._batches,
            "owners": owners,
            "engine": self._ctx.stats() if not self._ctx.closed else {},
            "external_address": {**self._votes.statistics(), "mapped": self._mapped},
        }
        if self._listener is not None:
            stats["listener"] = self._listener.statistics()
        if self._claims or self._refused_unclaimed:
            stats["claims"] = [c.statistics() for c in self._claims]
            stats["refused_unclaimed"] = self._refused_unclaimed
        if not self._ctx.closed:
            stats.update(self._driver.statistics(self._ctx))
        return stats

    # ---- engine seams (for streams, the listener, connect, punch) ---------------
    #
    # The engine is driven from two places: the Endpoint's own tasks (receive,
    # timer, writer) and the callers of these methods.  A caller brackets
    # every engine call: before_engine_call(), the call(s) on a Socket,
    # after_engine_call().

    def check_open(self) -> None:
        """Raise trio.ClosedResourceError if the Endpoint is closed."""
        if self._closed:
            raise trio.ClosedResourceError("the Endpoint is closed")

    @property
    def engine_closed(self) -> bool:
        """Whether the engine is gone (the Endpoint closed): engine sockets
        must not be called any more."""
        return self._ctx.closed

    def before_engine_call(self) -> None:
        """Call before calling the engine (a Socket's write, read, close,
        ...) from outside the Endpoint's tasks.  In simulated mode the
        engine's clock is trio's and this advances it; otherwise it does
        nothing."""
        if self._virtual:
            now = int(trio.current_time() * 1_000_000)
            if now > self._ctx.now_us:
                self._ctx.now_us = now

    def after_engine_call(self) -> None:
        """Call after calling the engine from outside the Endpoint's tasks:
        delivers the events the call caused, sends (flushes) what it queued,
        and re-arms the timer.  Without it the engine's output would wait
        for the next received datagram or timer."""
        self._after_engine()

    def open_engine_socket(self, addr: tuple[Any, ...]) -> _utp.Socket:
        """A new engine socket connecting to ``addr``; its SYN leaves at the
        next :meth:`after_engine_call`.  Until it is given to a stream
        (:meth:`register_stream`), its events go to ``sock.userdata``, a
        callable taking ``(kind, arg)``."""
        self.check_open()
        self.before_engine_call()
        sock = self._ctx.create_socket()
        sock.connect(addr)
        return sock

    def watch_send_room(self, stream: UTPStream) -> None:
        """Have ``stream._check_send_room()`` called after every engine step
        until :meth:`unwatch_send_room` (a task waits for its send buffer to
        drain, which no engine event announces by itself)."""
        self._room_waiters.add(stream)

    def unwatch_send_room(self, stream: UTPStream) -> None:
        self._room_waiters.discard(stream)

    def register_stream(self, sock: _utp.Socket, stream: UTPStream) -> None:
        """Route the events of engine socket ``sock`` to ``stream`` (its
        ``_on_event``) until the engine destroys the socket."""
        self._streams[sock] = stream

    def update_admission(self) -> None:
        """Tell the engine who may connect, after a listener or claim was
        opened, paused, resumed, closed or given a firewall.  With only the
        Endpoint's listener and no firewall, the engine decides alone (no
        Python per SYN); otherwise it asks :meth:`_admit` before answering
        each SYN."""
        if self._ctx.closed:
            return
        self._claims = [c for c in self._claims if not c.closed]
        main = self.listener
        self._ctx.listening = bool(self._claims) or (main is not None and not main.paused)
        python = bool(self._claims) or (main is not None and main.firewall is not None)
        self._ctx.firewall = self._admit if python else None

    def _route(self, addr: Any) -> UTPListener | None:
        for claim in self._claims:
            if not claim.closed:
                try:
                    if claim.match is not None and claim.match(addr):
                        return claim
                except BaseException as exc:
                    claim._report(exc)
                    return None
        return self.listener

    def _admit(self, addr: Any) -> bool:
        target = self._route(addr)
        if target is None:
            self._refused_unclaimed += 1
            return False
        return target._admit(addr)

    def set_accepting(self, accepting: bool) -> None:
        """Whether the engine accepts incoming SYNs (while not, it refuses
        them with a RESET): a low-level override until the next
        :meth:`update_admission`, which listeners and claims call when they
        open, pause, resume or close.  Does nothing once the engine is
        closed."""
        if not self._ctx.closed:
            self._ctx.listening = accepting

    async def wait_engine_progress(self) -> None:
        """Wait until the engine has next handled input, a timer or a call
        (and its events were delivered), or the Endpoint closed: for
        waiting on a condition of the engine's state (everything
        acknowledged, ...) without polling."""
        if self._closed:
            await trio.lowlevel.checkpoint()
            return
        await self._progress_lot.park()

    def _after_engine(self) -> None:
        ctx = self._ctx
        if ctx.closed:
            return
        for kind, sock, arg in ctx.take_events():
            self._dispatch(kind, sock, arg)
        for stream in list(self._room_waiters):
            stream._check_send_room()
        self._flush()
        self._rearm_timer()
        if self._progress_lot:
            self._progress_lot.unpark_all()

    def _dispatch(self, kind: EventKind, sock: _utp.Socket, arg: Any) -> None:
        if kind is _ACCEPT:
            listener = self._route(arg)
            if listener is None or listener.closed:
                sock.close()  # the engine only accepts while we listen; a race
                return
            listener._on_accept(sock, arg)
            return
        stream = self._streams.get(sock)
        if stream is None:
            waiter = sock.userdata
            if waiter is not None:
                waiter(kind, arg)  # a connection attempt in progress
            return
        if kind is _DESTROYED:
            del self._streams[sock]
            if not self._streams:
                self._drained_lot.unpark_all()
        stream._on_event(kind, arg)

    def _flush(self) -> None:
        if self._send_blocked or self._ctx.closed:
            return
        try:
            remaining = self._driver.flush(self._ctx)
        except OSError as exc:  # the socket itself is unusable
            self._fail(exc)
            return
        if remaining:
            # The kernel's send buffer is full: a writer task waits for
            # writability; nothing is lost and the engine is not told.
            self._send_blocked = True
            self._writer_lot.unpark()

    def _rearm_timer(self) -> None:
        scope = self._timer_scope
        if scope is None:
            return
        t = self._ctx.next_timeout()
        if t is None:
            return
        deadline = trio.current_time() + t / 1_000_000
        if deadline < scope.deadline:
            scope.deadline = deadline

    def _fail(self, exc: BaseException) -> None:
        if self._failure is None:
            self._failure = exc

    # ---- tasks -------------------------------------------------------------------

    async def _receive_loop(self) -> None:
        driver, ctx = self._driver, self._ctx
        while True:
            await driver.wait_readable()
            self.before_engine_call()
            if driver.receive(ctx):
                self._batches += 1
                ctx.issue_deferred_acks()
                self._deliver_others()
            self._note_unreachable()
            self._after_engine()

    def _deliver_others(self) -> None:
        for cls, data, addr in self._driver.take_other(self._ctx):
            owner = _CLASS_OWNER.get(cls, OWNER_OTHER)
            q = self._queues.get(owner) or (self._queues.get(OWNER_OTHER) if owner != OWNER_OTHER else None)
            if q is None:
                self._unowned[owner] += 1
            else:
                q._put(data, addr)

    async def _timer_loop(self) -> None:
        ctx = self._ctx
        while True:
            with trio.CancelScope() as scope:
                self._timer_scope = scope
                t = ctx.next_timeout()
                scope.deadline = math.inf if t is None else trio.current_time() + t / 1_000_000
                await trio.sleep_forever()
            self._timer_scope = None
            self.before_engine_call()
            ctx.check_timeouts()
            self._after_engine()

    async def _writer_loop(self) -> None:
        while True:
            while not self._send_blocked:
                await self._writer_lot.park()
            await self._driver.wait_writable()
            self._send_blocked = False
            self._flush()
            if self._send_blocked:
                # ENOBUFS: the socket says writable while the device queue
                # is full; back off a little instead of spinning.
                await trio.sleep(0.001)

    async def run(self, task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
        """Run the Endpoint's tasks (receive, timer, writer) until
        cancelled; ``task_status.started()`` gets their cancel scope.
        :func:`utp.run_endpoint` and :func:`utp.open_endpoint` call it."""
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._receive_loop)
            nursery.start_soon(self._timer_loop)
            nursery.start_soon(self._writer_loop)
            task_status.started(nursery.cancel_scope)

    # ---- shutdown -----------------------------------------------------------------

    async def shutdown(self) -> None:
        """Close every connection and wait (at most ``linger`` seconds) for
        the engine to finish their FIN exchanges, so data written just before
        the Endpoint closes still arrives.  The tasks must still run
        (:meth:`run`); :meth:`close_now` follows."""
        for claim in list(self._claims):
            claim._shutdown()
        if self._listener is not None:
            self._listener._shutdown()
        for stream in list(self._streams.values()):
            stream._close_engine_socket()
        self.after_engine_call()
        with trio.move_on_after(self.linger):
            while self._streams:
                await self._drained_lot.park()
            # TIME_WAIT: a peer whose last FIN-ACK from us was lost resends
            # its FIN; stay (about two RTOs, see utpkit_timewait_linger) to
            # ACK it, else it hits a closed port and reports a reset after
            # every byte arrived.
            while not self._ctx.closed:
                self.before_engine_call()  # the simulated clock, for the query
                wait = self._ctx.timewait_linger()
                if wait is None:
                    break
                await trio.sleep(wait / 1_000_000)

    def close_now(self) -> None:
        """Close at once: streams fail, queues close, the socket closes.
        Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._progress_lot.unpark_all()
        self._drained_lot.unpark_all()
        for stream in list(self._streams.values()):
            stream._on_endpoint_closed()
        self._streams.clear()
        for q in self._queues.values():
            q.close()
        for claim in list(self._claims):
            claim._shutdown()
        if self._listener is not None:
            self._listener._shutdown()
        self._unreachable_lot.unpark_all()
        try:
            if not self._ctx.closed:
                self._flush()
        finally:
            self._ctx.close()
            self._driver.close()


def _bind_udp(host: str | None, port: int, family: int | None) -> trio.socket.SocketType:
    """A non-blocking UDP socket bound to (host, port); host None binds the
    dual-stack wildcard when the machine has IPv6, else 0.0.0.0."""
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be 0..65535, not {port}")
    if family is None:
        if host is None:
            family = _socket.AF_INET6 if _socket.has_ipv6 else _socket.AF_INET
        else:
            family = _socket.AF_INET6 if ":" in host else _socket.AF_INET
    sock = trio.socket.socket(family, _socket.SOCK_DGRAM)
    try:
        if family == _socket.AF_INET6:
            sock.setsockopt(_socket.IPPROTO_IPV6, _socket.IPV6_V6ONLY, 0 if host in (None, "::") else 1)
        bind_host = host if host is not None else ("::" if family == _socket.AF_INET6 else "0.0.0.0")
        try:
            sock._sock.bind((bind_host, port))
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(exc.errno, f"UDP port {port} on {bind_host} is already in use") from None
            if exc.errno in (errno.EADDRNOTAVAIL, errno.EAFNOSUPPORT):
                raise OSError(exc.errno, f"cannot bind to {bind_host}: {exc.strerror}") from None
            raise
    except BaseException:
        sock.close()
        raise
    return sock


def make_udp_endpoint(host: str | None, port: int, *, family: int | None,
                      recv_buffer: int | None, send_buffer: int | None,
                      socket_buffer: int | None, linger: float,
                      udp_mtu: int | None, options: dict[int, int] | None) -> Endpoint:
    sock = _bind_udp(host, port, family)
    return endpoint_on_socket(sock, recv_buffer=recv_buffer, send_buffer=send_buffer,
                              socket_buffer=socket_buffer, linger=linger, udp_mtu=udp_mtu,
                              options=options)


def endpoint_on_socket(sock: trio.socket.SocketType, *, recv_buffer: int | None,
                       send_buffer: int | None, socket_buffer: int | None, linger: float,
                       udp_mtu: int | None = None,
                       options: dict[int, int] | None = None) -> Endpoint:
    """An Endpoint on an already bound UDP socket (also the one birthday
    probing met through); on failure the socket is closed."""
    try:
        ctx = _utp.Context(udp_mtu=udp_mtu)
        try:
            for opt, value in (options or {}).items():
                ctx.set_option(opt, value)
            driver = UDPDriver(sock, ctx, socket_buffer=socket_buffer)
        except BaseException:
            ctx.close()
            raise
    except BaseException:
        sock.close()
        raise
    return Endpoint(driver, ctx, recv_buffer=recv_buffer, send_buffer=send_buffer, linger=linger)


def check_positive(name: str, value: float | None) -> None:
    if value is not None and not value > 0:
        raise ValueError(f"{name} must be positive, not {value!r}")


Callback = Callable[[EventKind, Any], None]
