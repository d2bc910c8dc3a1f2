"""A pure-Python simulated network of sans-I/O DHT nodes on a virtual clock.

For tests and ``python -m dht.bench``: hundreds of :class:`DHTCore` nodes
exchange real KRPC datagrams through one seeded event queue; time is a
number that jumps from event to event, so hours of DHT time take seconds.
"""

from __future__ import annotations

import heapq
import random
from typing import Any, Callable, Optional

from ._core import DHTCore, LookupDone

__all__ = ["SimDHT"]


class SimDHT:
    """Nodes at distinct addresses, a one-way delay drawn per datagram from
    ``delay`` (min, max) seconds, and a loss probability."""

    def __init__(self, seed: int = 0, *, delay: tuple[float, float] = (0.01, 0.05),
                 loss: float = 0.0) -> None:
        self.rng = random.Random(seed)
        self.delay = delay
        self.loss = loss
        self.now = 0.0
        self.nodes: dict[tuple, DHTCore] = {}
        self.events: dict[tuple, list] = {}
        self._heap: list = []
        self._seq = 0
        self._timer_at: dict[tuple, float] = {}
        self.sent = 0
        self.delivered = 0
        self.lost = 0

    def add_node(self, addr: tuple, **kw: Any) -> DHTCore:
        node = DHTCore(rng=random.Random(self.rng.getrandbits(64)), now=self.now, **kw)
        self.nodes[addr] = node
        self.events[addr] = []
        self._after(addr)
        return node

    def remove_node(self, addr: tuple) -> None:
        self.nodes.pop(addr, None)
        self._timer_at.pop(addr, None)

    def _push(self, t: float, kind: str, payload: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _after(self, addr: tuple) -> None:
        """Collect what a node produced after it was called."""
        node = self.nodes.get(addr)
        if node is None:
            return
        for data, dst in node.datagrams_to_send(self.now):
            self.sent += 1
            if self.loss and self.rng.random() < self.loss:
                self.lost += 1
                continue
            self._push(self.now + self.rng.uniform(*self.delay), "dgram", (addr, dst, data))
        while True:
            ev = node.next_event()
            if ev is None:
                break
            self.events[addr].append(ev)
        t = node.get_timer()
        if t < self._timer_at.get(addr, float("inf")) or self._timer_at.get(addr, -1) < self.now:
            self._timer_at[addr] = t
            self._push(t, "timer", addr)

    def call(self, addr: tuple, fn: Callable[[DHTCore], Any]) -> Any:
        """Run ``fn(node)`` now and collect its output."""
        out = fn(self.nodes[addr])
        self._after(addr)
        return out

    def step(self) -> bool:
        if not self._heap:
            return False
        t, _, kind, payload = heapq.heappop(self._heap)
        self.now = max(self.now, t)
        if kind == "dgram":
            src, dst, data = payload
            node = self.nodes.get(dst)
            if node is None:
                return True
            self.delivered += 1
            node.receive_datagram(data, src, self.now)
            self._after(dst)
        else:
            addr = payload
            node = self.nodes.get(addr)
            if node is None or self._timer_at.get(addr) != t:
                return True
            node.handle_timer(self.now)
            self._timer_at.pop(addr, None)
            self._after(addr)
        return True

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        while self._heap and self._heap[0][0] <= end:
            self.step()
        self.now = end

    def run_until_done(self, addr: tuple, lookup: int, limit: float = 120.0) -> Optional[LookupDone]:
        """Run until ``addr`` reports LookupDone for ``lookup`` (or ``limit``
        virtual seconds pass)."""
        end = self.now + limit
        while self.now <= end:
            for ev in self.events[addr]:
                if isinstance(ev, LookupDone) and ev.lookup == lookup:
                    return ev
            if not self.step():
                break
        return None

    def build(self, n: int, *, base: str = "10", port: int = 6881, settle: float = 60.0,
              **kw: Any) -> list[tuple]:
        """Start ``n`` nodes; each bootstraps from a few that are already up."""
        addrs: list[tuple] = []
        for i in range(n):
            j = i + 1
            addr = (f"{base}.{(j >> 16) & 255}.{(j >> 8) & 255}.{j & 255}", port)
            self.add_node(addr, **kw)
            boot = self.rng.sample(addrs, min(3, len(addrs))) if addrs else []
            if boot:
                self.call(addr, lambda nd: nd.bootstrap(boot, self.now))
            addrs.append(addr)
            self.run_for(0.2)
        self.run_for(settle)
        return addrs
