"""utp.testing -- a seeded, virtual-time network for testing the uTP engine.

Several real engines (``utp.Context(virtual_time=True)``) exchange datagrams
over simulated links; nothing touches a real socket and nothing reads the real
clock, so a run is fast and exactly reproducible from its seed.

Quick start::

    from utp.testing import Network, transfer

    with Network(seed=1) as net:
        a = net.add_node("a")
        b = net.add_node("b")
        net.link(a, b, delay_us=20_000, bandwidth_bps=20e6, queue_bytes=64_000,
                 loss=0.01)
        r = transfer(net, a, b, 8 << 20)
        assert r.ok
        print(r.goodput_bps, r.rexmit, r.lost)

Model
-----
- **Time** is an integer count of microseconds, ``Network.now``.  An event
  heap holds ``(time_us, seq, action, arg)``; ``seq`` makes the order of
  events at the same instant the order they were scheduled, so a run depends
  on nothing but the seed and the calls made.
- **Randomness**: every random choice (loss, duplication, reordering, jitter,
  the engines' own seeds, payload bytes) comes from one ``random.Random(seed)``,
  ``Network.rng``.
- **Nodes** (``Node``) own one engine each, at one address: ``(host, port)``
  for IPv4 or ``(host, port, 0, 0)`` for IPv6.  Hosts are taken from the
  documentation ranges (192.0.2.0/24, 2001:db8::/32).
- **Links** (``Link``) exist per direction and are made on first use with
  ``Network.link_defaults``.  A datagram sent on a link goes through, in
  this order: the ``filter`` hook, the MTU check, the drop-tail queue in front
  of the bottleneck (``bandwidth_bps``, ``queue_bytes``), random ``loss``,
  propagation ``delay_us`` plus ``jitter_us``, random reordering and random
  duplication.  Jitter never reorders by itself: a packet never arrives
  before one sent earlier on the same link unless it was picked for
  reordering (then it is held ``reorder_delay_us`` longer and later packets
  overtake it).
- **Engine driving**: after every interaction with a node's engine (a
  datagram delivered, a timer fired, an application call) the node drains
  the engine's datagrams onto the links and its events onto its
  ``SimConnection`` objects, then schedules its next timer from
  ``Context.next_timeout()``.  When all datagrams due at one instant have
  been delivered, every node that received any gets
  ``issue_deferred_acks()`` -- unless the network was made with
  ``deferred_acks=False``, which leaves ACKs to the engine's own ACK timer.

Scripting a test
----------------
- ``net.run(until=..., condition=..., max_events=...)`` runs the heap;
  ``net.run_for(duration_us)`` is relative.
- ``net.call_at(t, fn)`` / ``net.call_later(dt, fn)`` run a function at a
  virtual time (change a link, close a connection); ``net.every(dt, fn)``
  samples (return False from fn to stop).
- ``link.configure(loss=..., ...)`` changes a link at any time;
  ``link.filter`` sees (and may drop or rewrite) every datagram.
- ``node.call(fn, *args)`` calls into an engine (``node.ctx`` or
  ``conn.sock``) and then lets the results reach the network.
- Connections between the same two nodes share their links, so several
  flows over one node pair compete for one bottleneck queue.

Measurements
------------
Each ``Link`` counts ``sent``, ``delivered``, ``duplicated``,
``dropped_loss``, ``dropped_queue``, ``dropped_mtu``, ``dropped_filter``,
``bytes_sent``, ``bytes_delivered``, and ``busy_us`` (time spent
serialising: utilisation = busy_us / elapsed), and keeps every packet's
queueing delay in ``queue_delays`` (microseconds waited before
transmission started).  ``Link.counters()`` returns them as a dict;
``sent + duplicated == delivered + dropped_* + in_flight`` always holds.
``SimConnection`` records the events its socket saw with their virtual
times, hashes what it received, and ``transfer()`` returns a
``TransferResult`` with goodput, elapsed time, retransmissions and losses.
"""

from __future__ import annotations

import dataclasses
import hashlib
import heapq
import ipaddress
import itertools
import math
import random
import socket
from collections import deque
from typing import Any, Callable, Iterable

from utp._utp import (
    UTP_UDP_DONTFRAG,
    Context,
    Socket,
)

__all__ = [
    "Network",
    "Node",
    "Link",
    "SimConnection",
    "PayloadSource",
    "TransferResult",
    "SocketBuffer",
    "transfer",
]

_CHUNK = 65536

# (host, port) or (host, port, flowinfo, scope_id), as utp.Context spells them.
Address = tuple[Any, ...]

# Bytes of IP + UDP header charged against a link's bandwidth and queue for
# every datagram, when the link does not say otherwise.
_OVERHEAD_V4 = 28
_OVERHEAD_V6 = 48


class PayloadSource:
    """A deterministic, cheap byte stream: chunk ``i`` is the 8-byte
    big-endian counter ``i`` followed by a fixed random block.  The counter
    makes every chunk distinct, so a transport that duplicates, drops or
    reorders chunks changes the stream's sha256."""

    def __init__(self, seed: int, chunk: int = _CHUNK) -> None:
        if chunk < 16:
            raise ValueError("chunk must be at least 16 bytes")
        self.chunk = chunk
        self._block = random.Random(seed).randbytes(chunk)
        self._index = 0

    def next_chunk(self, size: int) -> bytes:
        """The next ``min(size, chunk)`` bytes of the stream."""
        size = min(size, self.chunk)
        i = self._index
        self._index = i + 1
        head = i.to_bytes(8, "big")
        if size <= 8:
            return head[:size]
        return head + self._block[8:size]

    def generate(self, nbytes: int) -> bytes:
        """The next `nbytes` bytes (for small reference streams in tests)."""
        parts = []
        while nbytes > 0:
            c = self.next_chunk(nbytes)
            parts.append(c)
            nbytes -= len(c)
        return b"".join(parts)


class Link:
    """One direction of the path between two nodes.

    Parameters (plain attributes; change them at any time, the change
    applies to datagrams sent from then on):

    delay_us
        One-way propagation delay.
    bandwidth_bps
        Bottleneck rate in bits per second, or None for no limit (and no
        queue).
    queue_bytes
        Drop-tail capacity in bytes of the queue in front of the bottleneck,
        the packet being serialised included; None means unlimited.  Only
        meaningful with a bandwidth.
    loss
        Probability that a packet is lost after it was transmitted.
    duplicate
        Probability that a delivered packet is delivered twice.
    reorder, reorder_delay_us
        Probability that a packet is held back an extra ``reorder_delay_us``
        so that later packets overtake it.
    jitter_us
        Extra delay drawn uniformly from [0, jitter_us] per packet; never
        reorders (see the module docstring).
    mtu
        Largest UDP payload the path carries, or None.  A larger datagram
        sent with UTP_UDP_DONTFRAG is dropped (``dropped_mtu``), and if
        ``icmp`` is true the sender's engine gets an ICMP "fragmentation
        needed" (process_icmp_fragmentation) one ``delay_us`` later; a larger
        datagram without the flag is delivered (fragmented by the "network")
        and counted in ``fragmented`` -- unless ``drop_fragments`` is true
        (a path whose middleboxes drop IP fragments, an MTU black hole): then
        it is dropped and counted in ``dropped_mtu`` too.
    overhead
        Bytes per datagram charged to bandwidth and queue on top of the UDP
        payload (IP and UDP headers); None: 28 for IPv4, 48 for IPv6.
    filter
        None, or a callable ``filter(now_us, data, flags)`` run on every
        datagram before anything else: return None to pass it unchanged,
        False to drop it (``dropped_filter``), or bytes to send instead.
        For tests that drop or corrupt particular packets.
    record_queue_delays
        Keep each packet's queueing delay in ``queue_delays`` (default True).
    """

    _PARAMS = ("delay_us", "bandwidth_bps", "queue_bytes", "loss", "duplicate",
               "reorder", "reorder_delay_us", "jitter_us", "mtu", "icmp",
               "drop_fragments", "overhead", "filter", "record_queue_delays")

    def __init__(self, net: Network, src: Node, dst: Node, **params: Any) -> None:
        self.net = net
        self.src = src
        self.dst = dst
        self.delay_us: int = 10_000
        self.bandwidth_bps: float | None = None
        self.queue_bytes: int | None = None
        self.loss: float = 0.0
        self.duplicate: float = 0.0
        self.reorder: float = 0.0
        self.reorder_delay_us: int = 0
        self.jitter_us: int = 0
        self.mtu: int | None = None
        self.icmp: bool = False
        self.drop_fragments: bool = False
        self.overhead: int | None = None
        self.filter: Callable[[int, bytes, int], Any] | None = None
        self.record_queue_delays: bool = True
        self.configure(**params)
        self._busy_until = 0.0  # when the bottleneck finishes its backlog
        self._last_arrival = 0  # FIFO floor for jittered packets
        self.reset_counters()

    def configure(self, **params: Any) -> Link:
        """Set parameters by name (see the class docstring); returns self."""
        for k, v in params.items():
            if k not in self._PARAMS:
                raise TypeError(f"unknown link parameter {k!r}")
            setattr(self, k, v)
        for p in ("loss", "duplicate", "reorder"):
            v = getattr(self, p)
            if not 0.0 <= v <= 1.0:
                raise ValueError(f"{p} must be a probability, not {v!r}")
        if self.delay_us < 0 or self.jitter_us < 0 or self.reorder_delay_us < 0:
            raise ValueError("delays must be >= 0")
        if self.bandwidth_bps is not None and self.bandwidth_bps <= 0:
            raise ValueError("bandwidth_bps must be > 0 or None")
        return self

    def reset_counters(self) -> None:
        """Zero every counter and forget the queue-delay samples."""
        self.sent = 0
        self.delivered = 0
        self.duplicated = 0
        self.fragmented = 0
        self.dropped_loss = 0
        self.dropped_queue = 0
        self.dropped_mtu = 0
        self.dropped_filter = 0
        self.bytes_sent = 0
        self.bytes_delivered = 0
        self.busy_us = 0.0
        self.queue_delays: list[int] = []

    @property
    def in_flight(self) -> int:
        """Packets (copies) scheduled for delivery and not yet delivered."""
        return (self.sent + self.duplicated - self.delivered - self.dropped_loss
                - self.dropped_queue - self.dropped_mtu - self.dropped_filter)

    @property
    def dropped(self) -> int:
        """All drops: loss, queue overflow, MTU, filter."""
        return self.dropped_loss + self.dropped_queue + self.dropped_mtu + self.dropped_filter

    def counters(self) -> dict[str, int | float]:
        """A snapshot of the counters (queue_delays excluded)."""
        return {
            "sent": self.sent,
            "delivered": self.delivered,
            "duplicated": self.duplicated,
            "fragmented": self.fragmented,
            "dropped_loss": self.dropped_loss,
            "dropped_queue": self.dropped_queue,
            "dropped_mtu": self.dropped_mtu,
            "dropped_filter": self.dropped_filter,
            "dropped": self.dropped,
            "in_flight": self.in_flight,
            "bytes_sent": self.bytes_sent,
            "bytes_delivered": self.bytes_delivered,
            "busy_us": self.busy_us,
        }

    @property
    def queued_bytes(self) -> float:
        """Bytes in the bottleneck queue right now (serialising one included)."""
        if self.bandwidth_bps is None:
            return 0.0
        backlog_us = self._busy_until - self.net.now
        return backlog_us * self.bandwidth_bps / 8e6 if backlog_us > 0 else 0.0

    def __repr__(self) -> str:
        return f"<Link {self.src.name}->{self.dst.name} sent={self.sent} delivered={self.delivered}>"

    # The hot path: one call per datagram the source node's engine sends.
    def _send(self, data: bytes, flags: int) -> None:
        net = self.net
        now = net.now
        self.sent += 1
        self.bytes_sent += len(data)
        if self.filter is not None:
            r = self.filter(now, data, flags)
            if r is False:
                self.dropped_filter += 1
                return
            if r is not None:
                data = bytes(r)
        size = len(data)
        if self.mtu is not None and size > self.mtu:
            if flags & UTP_UDP_DONTFRAG:
                self.dropped_mtu += 1
                if self.icmp:
                    net._schedule(now + self.delay_us, self.src._icmp_fragmentation,
                                  (data, self.dst.addr, self.mtu))
                return
            if self.drop_fragments:
                self.dropped_mtu += 1
                return
            self.fragmented += 1
        rng = net.rng
        depart = float(now)
        bw = self.bandwidth_bps
        if bw is not None:
            wire = size + (self.overhead if self.overhead is not None
                           else self.src._overhead)
            busy = self._busy_until
            if busy > now:
                if (self.queue_bytes is not None
                        and (busy - now) * bw / 8e6 + wire > self.queue_bytes):
                    self.dropped_queue += 1
                    return
                start = busy
            else:
                start = depart
            tx = wire * 8e6 / bw
            self.busy_us += tx
            self._busy_until = depart = start + tx
            if self.record_queue_delays:
                self.queue_delays.append(int(start - now))
        if self.loss and rng.random() < self.loss:
            self.dropped_loss += 1
            return
        arrive = math.ceil(depart) + self.delay_us
        if self.jitter_us:
            arrive += rng.randint(0, self.jitter_us)
        if self.reorder and rng.random() < self.reorder:
            arrive += self.reorder_delay_us
        else:
            if arrive < self._last_arrival:
                arrive = self._last_arrival
            self._last_arrival = arrive
        net._schedule(arrive, self._arrive, data)
        if self.duplicate and rng.random() < self.duplicate:
            self.duplicated += 1
            net._schedule(arrive, self._arrive, data)

    def _arrive(self, data: bytes) -> None:
        self.delivered += 1
        self.bytes_delivered += len(data)
        self.dst._receive(data, self.src.addr)


class SocketBuffer:
    """A receiving UDP socket's kernel buffer and the loaded reader behind it.

    Real receivers are not infinitely fast: datagrams wait in the socket's
    receive queue until the application reads them, and the kernel drops
    what does not fit (Linux charges each datagram its buffer's true size,
    about 2.3 KiB for a full 1.4 KB packet, against ``SO_RCVBUF``, 208 KiB by
    default).  A sender that bursts a whole window back to back overflows
    such a queue although the link and the receiver's advertised window
    have room; this models that, for engine nodes and foreign peers alike.

    capacity
        Bytes of buffer (``net.core.rmem_default``: 212992).
    overhead
        Bytes charged per datagram on top of its length (skb true size).
    read_rate
        Bytes per second the reader drains at most: each wake-up reads up to
        ``read_rate * interval_us`` bytes (at least one datagram).
    interval_us
        The reader wakes at most this often; while data keeps coming it
        reads one batch per interval, and after each batch the owner sends
        its deferred ACKs (as libutp's and libtorrent's loops do).

    Counters: ``arrived``, ``dropped``, ``read``, ``batches``, ``peak``
    (bytes charged at the fullest), ``used`` (bytes charged now).
    """

    def __init__(self, net: Network, deliver: Callable[[list[tuple[bytes, Address]]], None], *,
                 capacity: int = 212_992, overhead: int = 896, read_rate: float = 100e6,
                 interval_us: int = 1000) -> None:
        if capacity <= 0 or read_rate <= 0 or interval_us <= 0 or overhead < 0:
            raise ValueError("socket buffer capacity, read_rate and interval_us must be > 0")
        self.net = net
        self.capacity = capacity
        self.overhead = overhead
        self.read_rate = read_rate
        self.interval_us = interval_us
        self._deliver = deliver
        self._queue: deque[tuple[bytes, Address]] = deque()
        self.used = 0
        self.peak = 0
        self.arrived = 0
        self.dropped = 0
        self.read = 0
        self.batches = 0
        self._read_at: int | None = None   # the scheduled read, if any
        self._last_read = -(1 << 62)

    def arrive(self, data: bytes, src: Address) -> None:
        self.arrived += 1
        charge = len(data) + self.overhead
        if self.used + charge > self.capacity:
            self.dropped += 1
            return
        self.used += charge
        if self.used > self.peak:
            self.peak = self.used
        self._queue.append((data, src))
        if self._read_at is None:
            self._read_at = max(self.net.now, self._last_read + self.interval_us)
            self.net._schedule(self._read_at, self._read_batch, None)

    def _read_batch(self, _arg: Any) -> None:
        self._read_at = None
        self._last_read = self.net.now
        budget = self.read_rate * self.interval_us / 1e6
        batch: list[tuple[bytes, Address]] = []
        q = self._queue
        while q and (not batch or budget >= len(q[0][0])):
            data, src = q.popleft()
            budget -= len(data)
            self.used -= len(data) + self.overhead
            batch.append((data, src))
        self.read += len(batch)
        self.batches += 1
        if q:
            self._read_at = self.net.now + self.interval_us
            self.net._schedule(self._read_at, self._read_batch, None)
        self._deliver(batch)

    def counters(self) -> dict[str, int]:
        return {"arrived": self.arrived, "dropped": self.dropped, "read": self.read,
                "batches": self.batches, "peak": self.peak, "capacity": self.capacity}


class Node:
    """One host with one uTP engine (``ctx``) at one address (``addr``).

    Use ``listen()`` to accept connections and ``connect()`` to open one;
    both give ``SimConnection`` objects.  To call the engine directly
    (``node.ctx`` or a ``conn.sock``), wrap the call in ``node.call(fn)`` or
    call ``node.poke()`` afterwards so the results reach the network and the
    timer is rescheduled.

    Attributes: ``name``, ``addr``, ``ctx``, ``connections`` (every
    SimConnection of this node, in creation order), ``accepted`` (the ones
    made by accepting), ``on_accept`` (None or a callable given each new
    accepted SimConnection), ``not_utp`` (``(time_us, data, source)`` of
    every delivered datagram the engine did not take), ``on_raw`` (None or a
    callable ``on_raw(data, source)`` for those), ``conn_defaults`` (keyword
    arguments for accepted SimConnections).
    """

    def __init__(self, net: Network, name: str, addr: Address, ctx: Context) -> None:
        self.net = net
        self.name = name
        self.addr = addr
        self.ctx = ctx
        self.ipv6 = len(addr) == 4
        self._overhead = _OVERHEAD_V6 if self.ipv6 else _OVERHEAD_V4
        self.connections: list[SimConnection] = []
        self.accepted: list[SimConnection] = []
        self.on_accept: Callable[[SimConnection], None] | None = None
        self.on_raw: Callable[[bytes, Address], None] | None = None
        self.not_utp: list[tuple[int, bytes, Address]] = []
        self.conn_defaults: dict[str, Any] = {}
        self._links: dict[Address, Link] = {}
        self._timer_at: int | None = None  # time of the earliest live timer event
        self._ack_pending = False
        self._draining = False
        self._again = False
        self.socket_buffer: SocketBuffer | None = None

    def __repr__(self) -> str:
        return f"<Node {self.name} {self.addr}>"

    # ---- application API --------------------------------------------------

    def listen(self, on_accept: Callable[[SimConnection], None] | None = None,
               **conn_defaults: Any) -> None:
        """Accept incoming connections from now on.  `on_accept` is called
        with each new SimConnection; `conn_defaults` are SimConnection
        keyword arguments for them (e.g. ``close_when_done=True``)."""
        self.ctx.listening = True
        if on_accept is not None:
            self.on_accept = on_accept
        self.conn_defaults.update(conn_defaults)

    def connect(self, addr: Address | Node, **kwargs: Any) -> SimConnection:
        """Open a connection to `addr` (an address or a Node).  Keyword
        arguments go to SimConnection (auto_read, keep_data,
        close_when_done, close_on_error, on_event)."""
        if isinstance(addr, Node):
            addr = addr.addr
        self._enter()
        sock = self.ctx.connect(addr)
        conn = SimConnection(self, sock, accepted=False, **kwargs)
        self._drain()
        return conn

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Run ``fn(*args)`` against this node's engine at the current virtual
        time, then drain and reschedule.  Returns fn's result."""
        self._enter()
        try:
            return fn(*args)
        finally:
            self._drain()

    def poke(self) -> None:
        """Drain and reschedule after touching ``ctx`` or a socket directly."""
        self._enter()
        self._drain()

    def send_raw(self, data: bytes, dst: Address | Node, flags: int = 0) -> None:
        """Send an arbitrary datagram over the link to `dst`, as if this
        node's engine had sent it (for malformed-packet tests)."""
        if isinstance(dst, Node):
            dst = dst.addr
        self.net._route(self, bytes(data), dst, flags)

    def set_socket_buffer(self, **params: Any) -> SocketBuffer:
        """Put a finite UDP receive buffer and a rate-limited reader in front
        of this node's engine (``SocketBuffer`` parameters); datagrams then
        reach the engine in read batches, each followed by one
        ``issue_deferred_acks()``, like the Endpoint's receive loop."""
        self.socket_buffer = SocketBuffer(self.net, self._receive_batch, **params)
        return self.socket_buffer

    def link_to(self, other: Node) -> Link:
        """The link from this node to `other` (made with defaults if new)."""
        return self.net.get_link(self, other)

    def close(self) -> None:
        """Destroy this node's engine (Context.close)."""
        self.ctx.close()

    # ---- engine driving ---------------------------------------------------

    def _enter(self) -> None:
        now = self.net.now
        ctx = self.ctx
        if ctx.now_us != now:
            ctx.now_us = now

    def _drain(self) -> None:
        """Move the engine's output to the network and its events to the
        connections until both are empty; then reschedule the timer."""
        if self._draining:
            # An event handler called into the engine; the outer loop
            # picks up whatever that produced.
            self._again = True
            return
        ctx = self.ctx
        if ctx.closed:
            return
        net = self.net
        self._draining = True
        try:
            while True:
                self._again = False
                dgrams = ctx.take_datagrams()
                for data, dst, flags in dgrams:
                    net._route(self, data, dst, flags)
                events = ctx.take_events()
                for kind, sock, arg in events:
                    if kind == "accept":
                        conn = SimConnection(self, sock, accepted=True, **self.conn_defaults)
                        self.accepted.append(conn)
                        conn._event("accept", arg)
                        if self.on_accept is not None:
                            self.on_accept(conn)
                    else:
                        conn = sock.userdata
                        if conn is not None:
                            conn._event(kind, arg)
                if not events and not dgrams and not self._again:
                    break
        finally:
            self._draining = False
        self._reschedule()

    def _reschedule(self) -> None:
        ctx = self.ctx
        if ctx.closed:
            return
        nt = ctx.next_timeout()
        if nt is None:
            return
        net = self.net
        due = net.now + nt
        if nt == 0:
            if self._ack_pending:
                return  # the end-of-instant ACK flush comes first
            if self._checked_at == net.now:
                # "Due now" although the timers just ran at this instant: what
                # is left is a deferred ACK (utpkit_next_timeout reports those
                # as due at once).  A real loop would issue it; so does the
                # simulation, unless it was told to leave ACKs to the engine's
                # timer -- then it looks again 1 ms later rather than spin.
                if net.deferred_acks:
                    self._ack_pending = True
                    net._ack_nodes.append(self)
                    return
                net.timer_spins += 1
                due = net.now + 1000
        if self._timer_at is None or due < self._timer_at or self._timer_at < net.now:
            self._timer_at = due
            net._schedule(due, self._on_timer, due)

    _checked_at = -1

    def _on_timer(self, due: int) -> None:
        if due != self._timer_at:
            return  # superseded by an earlier timer event
        self._timer_at = None
        ctx = self.ctx
        if ctx.closed:
            return
        self._enter()
        nt = ctx.next_timeout()
        if nt is not None and nt == 0:
            self._checked_at = self.net.now
            ctx.check_timeouts()
        self._drain()

    def _process(self, data: bytes, src: Address) -> bool:
        """One datagram into the engine; False (and recorded) if not uTP."""
        if self.ctx.process_udp(data, src):
            return True
        self.not_utp.append((self.net.now, data, src))
        if self.on_raw is not None:
            self.on_raw(data, src)
        return False

    def _receive_batch(self, batch: list[tuple[bytes, Address]]) -> None:
        ctx = self.ctx
        if ctx.closed:
            return
        self._enter()
        for data, src in batch:
            self._process(data, src)
        ctx.issue_deferred_acks()
        self._drain()

    def _receive(self, data: bytes, src: Address) -> None:
        if self.socket_buffer is not None:
            self.socket_buffer.arrive(data, src)
            return
        ctx = self.ctx
        if ctx.closed:
            return
        net = self.net
        now = net.now
        if ctx.now_us != now:
            ctx.now_us = now
        if self._process(data, src) and net.deferred_acks and not self._ack_pending:
            self._ack_pending = True
            net._ack_nodes.append(self)
        self._drain()

    def _flush_acks(self) -> None:
        self._ack_pending = False
        if self.ctx.closed:
            return
        self._enter()
        self.ctx.issue_deferred_acks()
        self._drain()

    def _icmp_fragmentation(self, arg: Address) -> None:
        data, dst, mtu = arg
        if self.ctx.closed:
            return
        self._enter()
        self.ctx.process_icmp_fragmentation(data, dst, mtu)
        self._drain()


class SimConnection:
    """The application end of one simulated uTP connection.

    It sends a byte source through the engine as fast as the engine accepts
    it (writing again on every "writable"/"connect" event), reads everything
    the engine delivers into a sha256 and a byte count, and records the
    events its socket saw.

    Construction (by ``Node.connect`` and by accepting) takes:

    auto_read (True)
        Read on every "readable" event; with False the data stays in the
        socket's buffer (and shrinks the advertised window) until ``read()``.
    keep_data (False)
        Also keep the received bytes in ``data`` (a bytearray).
    close_when_done (False)
        ``close()`` once the peer's FIN arrived and everything queued with
        ``send()`` has been written and shut down (or nothing was queued).
    close_on_error (True)
        ``close()`` on an "error" event (an errored socket is only closable).
    on_event (None)
        A callable ``on_event(conn, kind, arg)`` run after each event.

    Attributes: ``sock`` (the utp.Socket), ``node``, ``accepted``,
    ``received`` (bytes read), ``received_sha256`` (hex digest so far),
    ``data`` (bytearray or None), ``written`` (bytes the engine accepted),
    ``queued`` (bytes queued by send()), ``sent_sha256`` (hex digest of
    everything queued), ``events`` (list of ``(time_us, kind, arg)`` for
    accept, connect, eof, error, destroyed), ``connected_at``, ``eof_at``,
    ``error``, ``error_at``, ``destroyed_at``, ``write_shutdown``,
    ``final_stats`` / ``final_info`` (the socket's stats()/info() at the
    moment it was destroyed).
    """

    def __init__(self, node: Node, sock: Socket, *, accepted: bool,
                 auto_read: bool = True, keep_data: bool = False,
                 close_when_done: bool = False, close_on_error: bool = True,
                 on_event: Callable[[SimConnection, str, Any], None] | None = None) -> None:
        self.node = node
        self.net = node.net
        self.sock = sock
        self.accepted = accepted
        self.auto_read = auto_read
        self.close_when_done = close_when_done
        self.close_on_error = close_on_error
        self.on_event = on_event
        sock.userdata = self
        node.connections.append(self)
        self.received = 0
        self._rx_hash = hashlib.sha256()
        self.data: bytearray | None = bytearray() if keep_data else None
        self.queued = 0
        self.written = 0
        self._tx_hash = hashlib.sha256()
        self._explicit: deque[bytes] = deque()
        self._gen_left = 0
        self._source: PayloadSource | None = None
        self._cur: memoryview | None = None
        self._shutdown_wanted = False
        self.write_shutdown = False
        self.events: list[tuple[int, str, Any]] = []
        self.connected_at: int | None = node.net.now if accepted else None
        self.eof_at: int | None = None
        self.error: int | None = None
        self.error_at: int | None = None
        self.destroyed_at: int | None = None
        self.closed = False
        self.final_stats: dict[str, Any] | None = None
        self.final_info: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return (f"<SimConnection {self.node.name}{' accepted' if self.accepted else ''} "
                f"rx={self.received} tx={self.written}/{self.queued}>")

    # ---- sending ----------------------------------------------------------

    def send(self, nbytes: int = 0, *, data: bytes | None = None,
             shutdown: bool = False) -> None:
        """Queue `nbytes` of deterministic payload (PayloadSource seeded from
        the network) and/or the bytes `data`, to be written as fast as the
        engine takes them; with ``shutdown=True`` the write side is shut down
        (FIN) once all of it has been written."""
        if data:
            data = bytes(data)
            self._explicit.append(data)
            self._tx_hash.update(data)
            self.queued += len(data)
        if nbytes > 0:
            if self._source is None:
                self._source = PayloadSource(self.net.rng.getrandbits(64))
            self._gen_left += nbytes
            self.queued += nbytes
        if shutdown:
            self._shutdown_wanted = True
        self.node.call(self._pump)

    @property
    def send_done(self) -> bool:
        """Everything queued has been written to the engine."""
        return self._cur is None and not self._explicit and self._gen_left == 0

    @property
    def sent_sha256(self) -> str:
        return self._tx_hash.hexdigest()

    def _pump(self) -> None:
        sock = self.sock
        if self.closed or not sock.connected or sock.destroyed:
            return
        while True:
            cur = self._cur
            if cur is None:
                if self._explicit:
                    cur = memoryview(self._explicit.popleft())
                elif self._gen_left > 0:
                    assert self._source is not None
                    chunk = self._source.next_chunk(self._gen_left)
                    self._gen_left -= len(chunk)
                    self._tx_hash.update(chunk)
                    cur = memoryview(chunk)
                else:
                    break
            n = sock.write(cur)
            self.written += n
            if n < len(cur):
                self._cur = cur[n:]
                return
            self._cur = None
        if self._shutdown_wanted and not self.write_shutdown:
            self.write_shutdown = True
            sock.shutdown_write()
        self._maybe_close()

    # ---- receiving --------------------------------------------------------

    def read(self, max: int = -1) -> bytes:
        """Read from the socket's buffer (for ``auto_read=False``); the bytes
        are counted and hashed like automatically read ones."""
        data: bytes = self.node.call(self.sock.read, max)
        self._consume(data)
        return data

    def _consume(self, data: bytes) -> None:
        if data:
            self.received += len(data)
            self._rx_hash.update(data)
            if self.data is not None:
                self.data += data

    @property
    def received_sha256(self) -> str:
        return self._rx_hash.hexdigest()

    # ---- closing ----------------------------------------------------------

    def shutdown_write(self) -> None:
        """Shut down the write side now (FIN after data already written)."""
        if not self.write_shutdown:
            self.write_shutdown = True
            self.node.call(self.sock.shutdown_write)

    def close(self) -> None:
        """Close the socket (idempotent).  Snapshots stats and info first."""
        if self.closed:
            return
        self.closed = True
        sock = self.sock
        if not sock.destroyed and not sock.closed:
            self.final_stats = sock.stats()
            self.final_info = sock.info()
            self.node.call(sock.close)

    def _maybe_close(self) -> None:
        if (self.close_when_done and not self.closed and self.eof_at is not None
                and self.send_done and (self.write_shutdown or self.queued == 0)):
            self.close()

    # ---- events -----------------------------------------------------------

    def _event(self, kind: str, arg: Any) -> None:
        now = self.net.now
        if kind == "readable":
            if self.auto_read and not self.closed:
                self._consume(self.sock.read())
        elif kind == "writable":
            self._pump()
        else:
            self.events.append((now, kind, arg))
            if kind == "connect":
                self.connected_at = now
                self._pump()
            elif kind == "eof":
                self.eof_at = now
                if self.auto_read and not self.closed:
                    self._consume(self.sock.read())
                self._maybe_close()
            elif kind == "error":
                if self.error is None:
                    self.error = arg
                    self.error_at = now
                if self.close_on_error:
                    self.close()
            elif kind == "destroyed":
                self.destroyed_at = now
                self.final_stats = self.sock.stats()
                self.final_info = self.sock.info()
                self.sock.userdata = None  # break the Socket <-> SimConnection cycle
        if self.on_event is not None:
            self.on_event(self, kind, arg)

    def stats(self) -> dict[str, int]:
        """The socket's stats() (live, or as it was when destroyed)."""
        return self.sock.stats()

    def info(self) -> dict[str, int]:
        """The socket's info() (live, or as it was when destroyed)."""
        return self.sock.info()


class Network:
    """The simulated network: nodes, links, the event heap and the clock.

    ``Network(seed=0, *, deferred_acks=True, start_us=0, **link_defaults)``
    -- `link_defaults` are Link parameters used for every link made from
    now on (see ``Link``).  Use as a context manager (or call ``close()``)
    so every engine is destroyed.

    Attributes: ``now`` (virtual microseconds), ``rng`` (the one
    random.Random), ``nodes`` (by name), ``links`` (by (src name, dst
    name)), ``unroutable`` (datagrams to addresses no node has),
    ``events_run``, ``timer_spins`` (times an engine reported a timer due
    right after its timers ran; should stay 0).
    """

    def __init__(self, seed: int = 0, *, deferred_acks: bool = True, start_us: int = 0,
                 **link_defaults: Any) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.now = start_us
        self.deferred_acks = deferred_acks
        self.link_defaults: dict[str, Any] = {}
        Link(self, None, None, **link_defaults)  # type: ignore[arg-type]  # validate
        self.link_defaults.update(link_defaults)
        self.nodes: dict[str, Node] = {}
        self.links: dict[tuple[str, str], Link] = {}
        self._by_addr: dict[Address, Node] = {}
        self._heap: list[tuple[int, int, Callable[[Any], None], Any]] = []
        self._seq = itertools.count()
        self._ack_nodes: list[Node] = []
        self.unroutable = 0
        self.events_run = 0
        self.timer_spins = 0
        self._n4 = 0
        self._n6 = 0

    def __enter__(self) -> Network:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Close every node's engine."""
        for node in self.nodes.values():
            node.close()

    # ---- topology ---------------------------------------------------------

    def add_node(self, name: str | None = None, *, ipv6: bool = False,
                 addr: Address | None = None, udp_mtu: int | None = None,
                 options: dict[int, int] | None = None, listen: bool = False) -> Node:
        """Add a node with its own engine.  `addr` defaults to the next free
        documentation address of the family; `options` are context options
        (``{utp.Option.MIN_RTO: 200, ...}``); `udp_mtu` is passed to the
        Context."""
        if addr is None:
            addr = self.next_address(ipv6)
        addr = _canonical(addr)
        if addr in self._by_addr:
            raise ValueError(f"address {addr!r} is already taken by {self._by_addr[addr]!r}")
        if name is None:
            name = f"n{len(self.nodes)}"
        if name in self.nodes:
            raise ValueError(f"node name {name!r} is already taken")
        ctx = Context(virtual_time=True, seed=self.rng.getrandbits(64), udp_mtu=udp_mtu)
        ctx.now_us = self.now
        for opt, val in (options or {}).items():
            ctx.set_option(opt, val)
        node = Node(self, name, addr, ctx)
        self.nodes[name] = node
        self._by_addr[addr] = node
        if listen:
            node.listen()
        return node

    def next_address(self, ipv6: bool = False) -> Address:
        """The next free documentation address of the family."""
        if ipv6:
            self._n6 += 1
            return (f"2001:db8::{self._n6:x}", 6881, 0, 0)
        n = self._n4
        self._n4 += 1
        return (f"192.0.2.{n % 254 + 1}", 6881 + n // 254)

    def add_peer(self, peer: Any) -> Any:
        """Attach a foreign endpoint (not one of our engines, e.g. a model
        of another uTP stack from :mod:`utp.simpeers`) at ``peer.addr``.  It
        needs ``name``, ``addr``, ``_links`` (a dict), ``_overhead``,
        ``_receive(data, src)`` and ``close()``, and sends with
        ``net._route(peer, data, dst, flags)``."""
        addr = peer.addr = _canonical(peer.addr)
        if addr in self._by_addr:
            raise ValueError(f"address {addr!r} is already taken by {self._by_addr[addr]!r}")
        if peer.name in self.nodes:
            raise ValueError(f"node name {peer.name!r} is already taken")
        self.nodes[peer.name] = peer
        self._by_addr[addr] = peer
        return peer

    def get_link(self, src: Node, dst: Node) -> Link:
        """The link src -> dst, made with ``link_defaults`` if new."""
        link = src._links.get(dst.addr)
        if link is None:
            link = Link(self, src, dst, **self.link_defaults)
            src._links[dst.addr] = link
            self.links[(src.name, dst.name)] = link
        return link

    def link(self, a: Node, b: Node, *, both: bool = True, **params: Any) -> tuple[Link, Link] | Link:
        """Configure the link a -> b (and b -> a unless ``both=False``) with
        Link parameters; returns the link(s)."""
        ab = self.get_link(a, b).configure(**params)
        if not both:
            return ab
        return ab, self.get_link(b, a).configure(**params)

    # ---- the event loop ---------------------------------------------------

    def _schedule(self, t: int, fn: Callable[[Any], None], arg: Any) -> None:
        heapq.heappush(self._heap, (t, next(self._seq), fn, arg))

    def call_at(self, t: int, fn: Callable[[], Any]) -> None:
        """Run ``fn()`` at virtual time `t` (for scripted tests: change a
        link, close a connection...).  Calls into an engine from `fn` should
        go through ``Node.call``."""
        self._schedule(max(t, self.now), lambda _arg: fn(), None)

    def call_later(self, delay_us: int, fn: Callable[[], Any]) -> None:
        """``call_at(now + delay_us, fn)``."""
        self.call_at(self.now + delay_us, fn)

    def every(self, interval_us: int, fn: Callable[[], Any], *, until: int | None = None) -> None:
        """Run ``fn()`` now and then every `interval_us` until it returns
        False or the clock passes `until` -- for sampling cwnd, queue
        occupancy and the like over a run.  While it is active the event
        heap never empties, so give ``run()`` an `until` or a `condition`."""
        if interval_us <= 0:
            raise ValueError("interval_us must be > 0")

        def tick(_arg: Any) -> None:
            if until is not None and self.now > until:
                return
            if fn() is False:
                return
            self._schedule(self.now + interval_us, tick, None)

        self._schedule(self.now, tick, None)

    def _route(self, src: Node, data: bytes, dst: Address, flags: int) -> None:
        link = src._links.get(dst)
        if link is None:
            node = self._by_addr.get(dst)
            if node is None:
                self.unroutable += 1
                return
            link = self.get_link(src, node)
        link._send(data, flags)

    def _flush_acks(self) -> None:
        nodes = self._ack_nodes
        self._ack_nodes = []
        for node in nodes:
            node._flush_acks()

    def run(self, until: int | None = None, *, condition: Callable[[], bool] | None = None,
            max_events: int | None = None) -> bool:
        """Run events in time order.

        Stops when `condition()` (checked before the first event and after
        every event) is true, when the next event lies after `until`
        (absolute virtual µs; the clock is then advanced to `until`), when
        `max_events` events have run, or when nothing is left to do.
        Returns True if it stopped because `condition` was met -- or, with no
        condition, because it reached `until` or ran out of events; False
        otherwise.
        """
        if condition is not None and condition():
            return True
        heap = self._heap
        pop = heapq.heappop
        count = 0
        while True:
            if self._ack_nodes and (not heap or heap[0][0] > self.now):
                self._flush_acks()
                if condition is not None and condition():
                    return True
                continue
            if not heap:
                break
            t = heap[0][0]
            if until is not None and t > until:
                break
            _, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            count += 1
            if condition is not None and condition():
                self.events_run += count
                return True
            if max_events is not None and count >= max_events:
                self.events_run += count
                return False
        self.events_run += count
        if until is not None and until > self.now:
            self.now = until
        return condition is None

    def run_for(self, duration_us: int, **kwargs: Any) -> bool:
        """``run(until=now + duration_us, ...)``."""
        return self.run(self.now + duration_us, **kwargs)

    def link_counters(self) -> dict[tuple[str, str], dict[str, int | float]]:
        """Counters of every link, by (src name, dst name)."""
        return {k: v.counters() for k, v in self.links.items()}


def _canonical(addr: Address) -> Address:
    """The address as the binding reports it (inet_ntop's spelling, which is
    the socket module's too)."""
    ip = ipaddress.ip_address(addr[0])
    if len(addr) == 4 or ip.version == 6:
        flow, scope = (addr[2], addr[3]) if len(addr) == 4 else (0, 0)
        host = socket.inet_ntop(socket.AF_INET6, ip.packed)
        return (host, int(addr[1]), int(flow), int(scope))
    return (str(ip), int(addr[1]))


@dataclasses.dataclass
class TransferResult:
    """What ``transfer()`` measured.

    nbytes: bytes sent in each direction.  elapsed_us: from the connect
    call until the last receiver saw EOF after all bytes.  goodput_bps:
    nbytes * 8 / elapsed (per direction).  ok: every byte arrived, hashes
    equal, before the timeout.  complete: finished before the timeout.
    clean_close: both sockets were destroyed without an error afterwards.
    rexmit / fastrexmit: retransmissions (timeout / fast) summed over both
    sockets (from their stats).  lost: datagrams dropped on the two links
    during the transfer (all causes).  srtt_us: the initiator's smoothed
    RTT near the end.  a_to_b / b_to_a: link counter deltas.  conn_a /
    conn_b: the two SimConnections.
    """

    nbytes: int
    elapsed_us: int
    goodput_bps: float
    ok: bool
    complete: bool
    clean_close: bool
    rexmit: int
    fastrexmit: int
    lost: int
    srtt_us: int
    a_stats: dict[str, Any]
    b_stats: dict[str, Any]
    a_to_b: dict[str, Any]
    b_to_a: dict[str, Any]
    conn_a: SimConnection
    conn_b: SimConnection | None


def _delta(after: dict[str, Any], before: dict[str, Any]) -> dict[str, Any]:
    return {k: after[k] - before.get(k, 0) for k in after}


def transfer(net: Network, a: Node, b: Node, nbytes: int, *, both_directions: bool = False,
             timeout_us: int = 600_000_000, settle_us: int = 120_000_000,
             keep_data: bool = False) -> TransferResult:
    """Send `nbytes` from `a` to `b` (and back too with `both_directions`)
    over a new connection and measure it.

    `b` is made to listen; the connection closes itself on both sides once
    each side has sent its data and seen the peer's FIN.  The run stops when
    all data arrived (or at `timeout_us` of virtual time); then up to
    `settle_us` more are run to let both sockets finish closing.
    """
    ab, ba = net.get_link(a, b), net.get_link(b, a)
    ab0, ba0 = ab.counters(), ba.counters()
    start = net.now
    box: dict[str, SimConnection] = {}
    prev_on_accept = b.on_accept

    def on_accept(conn: SimConnection) -> None:
        if "b" in box or conn.sock.peername != a.addr:
            if prev_on_accept is not None:
                prev_on_accept(conn)
            return
        box["b"] = conn
        conn.close_when_done = True
        if keep_data:
            conn.data = bytearray()
        if both_directions:
            conn.send(nbytes, shutdown=True)

    b.listen()
    b.on_accept = on_accept
    try:
        ca = a.connect(b.addr, close_when_done=True, keep_data=keep_data)
        ca.send(nbytes, shutdown=True)

        def done() -> bool:
            cb = box.get("b")
            if ca.error is not None or cb is None:
                return ca.error is not None
            if cb.error is not None:
                return True
            if cb.received < nbytes or cb.eof_at is None:
                return False
            if both_directions and (ca.received < nbytes or ca.eof_at is None):
                return False
            return True

        complete = net.run(start + timeout_us, condition=done)
        cb = box.get("b")
        end = net.now
        snap_a = ca.sock.stats()
        info_a = ca.sock.info()
        snap_b: dict[str, int] = cb.sock.stats() if cb is not None else {}
        net.run(net.now + settle_us,
                condition=lambda: ca.destroyed_at is not None
                and (cb is None or cb.destroyed_at is not None))
    finally:
        b.on_accept = prev_on_accept
    ok = (complete and cb is not None and ca.error is None and cb.error is None
          and cb.received == nbytes and cb.received_sha256 == ca.sent_sha256)
    if both_directions and cb is not None:
        ok = ok and ca.received == nbytes and ca.received_sha256 == cb.sent_sha256
    clean = (ca.destroyed_at is not None and ca.error is None and cb is not None
             and cb.destroyed_at is not None and cb.error is None)
    stats_a = ca.final_stats or snap_a
    stats_b = (cb.final_stats or snap_b) if cb is not None else {}
    elapsed = max(end - start, 1)
    a_to_b, b_to_a = _delta(ab.counters(), ab0), _delta(ba.counters(), ba0)
    return TransferResult(
        nbytes=nbytes,
        elapsed_us=elapsed,
        goodput_bps=nbytes * 8e6 / elapsed,
        ok=ok,
        complete=complete and cb is not None and ca.error is None and cb.error is None,
        clean_close=clean,
        rexmit=stats_a.get("rexmit", 0) + stats_b.get("rexmit", 0),
        fastrexmit=stats_a.get("fastrexmit", 0) + stats_b.get("fastrexmit", 0),
        lost=int(a_to_b["dropped"] + b_to_a["dropped"]),
        srtt_us=info_a.get("srtt_us", 0),
        a_stats=stats_a,
        b_stats=stats_b,
        a_to_b=a_to_b,
        b_to_a=b_to_a,
        conn_a=ca,
        conn_b=cb,
    )
