"""A simulated datagram network on trio's clock, for running real Endpoints.

:mod:`utp.testing` drives bare engines with its own event loop; this module
is for the trio layer: each simulated host gets an :class:`~utp.Endpoint`
whose driver hands datagrams to a :class:`SimNetwork` instead of a socket.
Links delay, drop, duplicate, reorder and jitter datagrams from one seeded
``random.Random``; the engine's clock is trio's, so under
``trio.testing.MockClock(autojump_threshold=0)`` every timer fires at its
exact virtual time and a test of minutes of protocol time takes
milliseconds::

    async with SimNetwork(seed=1) as net:
        net.set_link("10.0.0.1", "10.0.0.2", delay=0.025, loss=0.05)
        async with net.endpoint("10.0.0.1", 5000) as a, \\
                   net.endpoint("10.0.0.2", 5000) as b:
            listener = b.listen()
            stream = await a.connect(("10.0.0.2", 5000))

Addresses are ``(host, port)`` tuples of literal IP addresses; a datagram
to an address with no endpoint is dropped (and counted), as is one for a
host pair whose link has been cut with ``set_link(..., up=False)``.
"""

from __future__ import annotations

import collections
import heapq
import ipaddress
import math
import random
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Deque

import trio

from . import _utp
from ._api import run_endpoint
from ._endpoint import Endpoint

__all__ = ["SimNetwork", "LinkParams", "SimDriver"]


@dataclass
class LinkParams:
    """How one direction between two hosts treats datagrams.

    ``delay`` is the one-way delay in seconds; ``jitter`` adds a uniform
    random 0..jitter seconds without reordering; ``reorder`` is the
    probability that a datagram is held back an extra ``reorder_delay``
    seconds (so later ones overtake it); ``loss`` and ``duplicate`` are
    probabilities; ``up`` False drops everything."""

    delay: float = 0.005
    loss: float = 0.0
    duplicate: float = 0.0
    reorder: float = 0.0
    reorder_delay: float = 0.010
    jitter: float = 0.0
    up: bool = True


class SimDriver:
    """The Endpoint driver of one simulated host:port."""

    virtual_time = True

    def __init__(self, net: SimNetwork, addr: tuple[str, int]) -> None:
        self.net = net
        self.local_address = addr
        self.inbox: Deque[tuple[bytes, tuple[str, int]]] = collections.deque()
        self.others: list[tuple[int, bytes, Any]] = []
        self.lot = trio.lowlevel.ParkingLot()
        self.received = 0
        self.sent = 0

    async def wait_readable(self) -> None:
        while not self.inbox:
            await self.lot.park()

    def receive(self, ctx: _utp.Context) -> int:
        n = 0
        while self.inbox:
            data, src = self.inbox.popleft()
            n += 1
            if not ctx.process_udp(data, src):
                self.others.append((_utp.classify(data), data, src))
        self.received += n
        return n

    def flush(self, ctx: _utp.Context) -> int:
        for data, dst, _flags in ctx.take_datagrams():
            self.sent += 1
            self.net._send(self.local_address, (str(dst[0]), int(dst[1])), data)
        return 0

    async def wait_writable(self) -> None:
        await trio.sleep_forever()  # flush never blocks

    def take_other(self, ctx: _utp.Context) -> list[tuple[int, bytes, Any]]:
        out, self.others = self.others, []
        return out

    def sendto(self, ctx: _utp.Context, data: bytes, addr: Any) -> None:
        self.sent += 1
        self.net._send(self.local_address, (str(addr[0]), int(addr[1])), bytes(data))

    def statistics(self, ctx: _utp.Context) -> dict[str, Any]:
        return {"sim": {"received": self.received, "sent": self.sent}}

    def close(self) -> None:
        self.net._drivers.pop(self.local_address, None)


class SimNetwork:
    """Hosts, links and the delivery task.  Use as ``async with``."""

    def __init__(self, seed: int = 0, *, trace: bool = False, **defaults: Any) -> None:
        """``defaults`` are LinkParams for every host pair not configured with
        :meth:`set_link`.  With ``trace`` every datagram handed to the
        network is recorded in :attr:`trace` as ``(time, src, dst, data)``."""
        self.rng = random.Random(seed)
        self.trace: list[tuple[float, tuple[str, int], tuple[str, int], bytes]] | None = [] if trace else None
        self.defaults = LinkParams(**defaults)
        self._links: dict[tuple[str, str], LinkParams] = {}
        self._drivers: dict[tuple[str, int], SimDriver] = {}
        self._heap: list[tuple[float, int, tuple[str, int], bytes, tuple[str, int]]] = []
        self._seq = 0
        self._wakeup = trio.lowlevel.ParkingLot()
        self._last_arrival: dict[tuple[str, str], float] = {}
        self.counters = collections.Counter[str]()
        self._nursery: trio.Nursery | None = None

    async def __aenter__(self) -> SimNetwork:
        self._nursery_cm = trio.open_nursery()
        self._nursery = await self._nursery_cm.__aenter__()
        self._nursery.start_soon(self._deliver_loop)
        return self

    async def __aexit__(self, *exc: Any) -> Any:
        assert self._nursery is not None
        self._nursery.cancel_scope.cancel()
        return await self._nursery_cm.__aexit__(*exc)

    # ---- configuration ----------------------------------------------------------------

    def set_link(self, a: str, b: str, *, both: bool = True, **params: Any) -> None:
        """Set the parameters of the direction a -> b (and b -> a when
        ``both``); unspecified ones keep their current values."""
        for src, dst in ((a, b), (b, a)) if both else ((a, b),):
            cur = self._links.get((src, dst), self.defaults)
            values = dict(cur.__dict__)
            values.update(params)
            self._links[(src, dst)] = LinkParams(**values)

    def link(self, a: str, b: str) -> LinkParams:
        return self._links.get((a, b), self.defaults)

    @asynccontextmanager
    async def endpoint(self, host: str, port: int, *, recv_buffer: int | None = None,
                       send_buffer: int | None = None, linger: float = 10.0,
                       udp_mtu: int | None = None, seed: int | None = None,
                       options: dict[int, int] | None = None) -> AsyncIterator[Endpoint]:
        """Run an Endpoint bound to ``host``:``port`` on this network for the
        duration of the block."""
        ipaddress.ip_address(host)
        addr = (host, port)
        if addr in self._drivers:
            raise OSError(f"{host}:{port} is already in use on the simulated network")
        driver = SimDriver(self, addr)
        self._drivers[addr] = driver
        ctx = _utp.Context(virtual_time=True, udp_mtu=udp_mtu,
                           seed=self.rng.getrandbits(64) if seed is None else seed)
        ctx.now_us = int(trio.current_time() * 1_000_000)
        for opt, value in (options or {}).items():
            ctx.set_option(opt, value)
        ep = Endpoint(driver, ctx, recv_buffer=recv_buffer, send_buffer=send_buffer, linger=linger)
        async with run_endpoint(ep) as running:
            yield running

    # ---- delivery ---------------------------------------------------------------------

    def _send(self, src: tuple[str, int], dst: tuple[str, int], data: bytes) -> None:
        p = self.link(src[0], dst[0])
        self.counters["sent"] += 1
        if self.trace is not None:
            self.trace.append((trio.current_time(), src, dst, data))
        if not p.up:
            self.counters["dropped_down"] += 1
            return
        rng = self.rng
        if p.loss and rng.random() < p.loss:
            self.counters["dropped_loss"] += 1
            return
        copies = 2 if p.duplicate and rng.random() < p.duplicate else 1
        if copies == 2:
            self.counters["duplicated"] += 1
        now = trio.current_time()
        key = (src[0], dst[0])
        for _ in range(copies):
            t = now + p.delay
            if p.jitter:
                # Jitter without reordering: never earlier than the last arrival.
                t = max(t + rng.uniform(0, p.jitter), self._last_arrival.get(key, 0.0))
                self._last_arrival[key] = t
            if p.reorder and rng.random() < p.reorder:
                t += p.reorder_delay
                self.counters["reordered"] += 1
            self._seq += 1
            heapq.heappush(self._heap, (t, self._seq, dst, data, src))
        self._wakeup.unpark_all()

    async def _deliver_loop(self) -> None:
        while True:
            if not self._heap:
                await self._wakeup.park()
                continue
            t = self._heap[0][0]
            if t > trio.current_time():
                with trio.move_on_at(t):
                    await self._wakeup.park()
                continue
            woken = set()
            while self._heap and self._heap[0][0] <= trio.current_time():
                _, _, dst, data, src = heapq.heappop(self._heap)
                driver = self._drivers.get(dst)
                if driver is None:
                    self.counters["dropped_no_host"] += 1
                    continue
                self.counters["delivered"] += 1
                driver.inbox.append((data, src))
                woken.add(dst)
            for dst in woken:
                d = self._drivers.get(dst)
                if d is not None:
                    d.lot.unpark_all()
