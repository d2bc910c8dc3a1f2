"""The trio driver: BEP 15 over a utp Endpoint's shared UDP socket.

The tracker's answers come in on the same port as uTP and the DHT; the
Endpoint's demultiplexer recognizes them (first word an action 0..3) and
queues them for the ``"tracker"`` owner, which is this client.  Sending from
the shared socket is the point: the address and port the tracker records
for us are the NAT mapping other peers can reach.

The plumbing (flush, deliver, the receive and timer loops) uses only the
:class:`~_utpkit.contract.DatagramCore` contract; starting a request is
BEP 15's own (announce, scrape).
"""

from __future__ import annotations

import math
import os
import random
import socket as _socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator
from urllib.parse import urlsplit

import trio

from _utpkit.addr import addr_key as _key
from _utpkit.contract import DatagramCore
from _utpkit.errors import NetworkError
from _utpkit.excgroup import unwrapped

from ._core import (
    DEFAULT_MAX_RETRIES, DEFAULT_RETRY_BASE, EVENT_NONE, RequestTimedOut, ScrapeResult,
    TrackerAnnounceResult, TrackerFailure, UDPTrackerProtocol,
)

__all__ = ["TrackerClient", "open_tracker_client", "TrackerError", "parse_tracker_url",
           "resolve_tracker"]


class TrackerError(NetworkError):
    """The tracker answered a request with an error message."""


def parse_tracker_url(url: str) -> tuple[str, int]:
    """``udp://HOST:PORT[/anything]`` -> (HOST, PORT); raises ValueError."""
    parts = urlsplit(url)
    if parts.scheme != "udp":
        raise ValueError(f"not a UDP tracker URL: {url!r} (want udp://HOST:PORT)")
    try:
        port = parts.port
    except ValueError:
        port = None
    if not parts.hostname or port is None or not 1 <= port <= 65535:
        raise ValueError(f"bad UDP tracker URL {url!r}: want udp://HOST:PORT")
    return parts.hostname, port


async def resolve_tracker(host: str, port: int, family: int = 0) -> tuple[str, int]:
    """The first address of host (a literal or a name) as ``(ip, port)``."""
    infos = await trio.socket.getaddrinfo(host, port, family, _socket.SOCK_DGRAM)
    if not infos:
        raise OSError(f"cannot resolve {host!r}")
    addr = infos[0][4]
    return str(addr[0]), int(addr[1])


class TrackerClient:
    """BEP 15 announces and scrapes to any number of UDP trackers, from one
    Endpoint.  Create it with :func:`open_tracker_client`.

    ``retry_base`` and ``max_retries`` set the retransmission schedule
    (BEP 15: 15 * 2^n s, n up to 8); a smaller base suits tests and callers
    with a deadline (they can also just cancel).

    Error handling: an error answer raises :class:`TrackerError`; no answer
    after the last retransmission raises TimeoutError.

    ``rng`` draws the transaction ids of every tracker's protocol core
    (default: seeded from os.urandom).
    """

    def __init__(self, ep: Any, *, retry_base: float = DEFAULT_RETRY_BASE,
                 max_retries: int = DEFAULT_MAX_RETRIES, rng: random.Random | None = None) -> None:
        self._ep = ep
        self.retry_base = retry_base
        self.max_retries = max_retries
        self._rng = rng if rng is not None else random.Random(int.from_bytes(os.urandom(16), "big"))
        self._protocols: dict[tuple[Any, int], tuple[UDPTrackerProtocol, tuple[str, int]]] = {}
        self._waiting: dict[tuple[int, int], tuple[trio.Event, list[Any]]] = {}
        self._wakeup = trio.lowlevel.ParkingLot()
        self.peer_id = b"-UK0100-" + os.urandom(12)

    def _protocol(self, tracker: tuple[str, int]) -> tuple[UDPTrackerProtocol, tuple[str, int]]:
        key = _key(tracker)
        if key not in self._protocols:
            addr = (str(tracker[0]), int(tracker[1]))
            self._protocols[key] = (UDPTrackerProtocol(addr, rng=self._rng,
                                                       retry_base=self.retry_base,
                                                       max_retries=self.max_retries), addr)
        return self._protocols[key]

    async def _flush(self, proto: DatagramCore) -> None:
        for data, addr in proto.datagrams_to_send(trio.current_time()):
            await self._ep.sendto(data, addr)
        self._wakeup.unpark_all()  # the timer may have moved earlier

    def _deliver(self, proto: DatagramCore) -> None:
        while (event := proto.next_event()) is not None:
            slot = self._waiting.get((id(proto), getattr(event, "request_id", None)))
            if slot is not None:
                slot[1].append(event)
                slot[0].set()

    async def _request(self, tracker: tuple[str, int], start: Any) -> Any:
        proto, addr = self._protocol(tracker)
        rid = start(proto, trio.current_time())
        done = trio.Event()
        box: list[Any] = []
        self._waiting[(id(proto), rid)] = (done, box)
        try:
            await self._flush(proto)
            await done.wait()
        finally:
            del self._waiting[(id(proto), rid)]
            if not box:
                proto.cancel(rid)
        event = box[0]
        where = f"{addr[0]}:{addr[1]}" if ":" not in addr[0] else f"[{addr[0]}]:{addr[1]}"
        if isinstance(event, TrackerFailure):
            raise TrackerError(f"tracker {where} refused the request: {event.message}")
        if isinstance(event, RequestTimedOut):
            raise TimeoutError(f"tracker {where} did not answer: {event.sent} requests "
                               f"sent over {event.waited:.1f} s")
        return event

    async def announce(self, tracker: tuple[str, int], info_hash: bytes, *, port: int | None = None,
                       event: int = EVENT_NONE, downloaded: int = 0, left: int = 0,
                       uploaded: int = 0, numwant: int = -1, key: int = 0) -> TrackerAnnounceResult:
        """Announce ``info_hash`` to ``tracker`` (a ``(ip, port)`` tuple);
        ``port`` defaults to the Endpoint's port.  Returns the tracker's
        peer list (which may include ourselves)."""
        if port is None:
            port = int(self._ep.local_address[1])
        peer_id = self.peer_id
        return await self._request(tracker, lambda proto, now: proto.announce(
            info_hash, peer_id, port, now=now, event=event, downloaded=downloaded, left=left,
            uploaded=uploaded, numwant=numwant, key=key))

    async def scrape(self, tracker: tuple[str, int], info_hashes: list[bytes]) -> ScrapeResult:
        return await self._request(tracker, lambda proto, now: proto.scrape(list(info_hashes), now=now))

    # ---- tasks -------------------------------------------------------------------------

    async def _receive_loop(self, queue: Any) -> None:
        async for data, addr in queue:
            try:
                found = self._protocols.get(_key(addr))
            except ValueError:
                continue
            if found is None:
                continue
            proto: DatagramCore = found[0]
            proto.receive_datagram(data, addr, trio.current_time())
            self._deliver(proto)
            await self._flush(proto)

    async def _timer_loop(self) -> None:
        while True:
            cores: list[DatagramCore] = [p for p, _ in self._protocols.values()]
            timers = [(p.get_timer(), p) for p in cores]
            due = [t for t, _ in timers if t is not None]
            with trio.move_on_at(min(due) if due else math.inf):
                await self._wakeup.park()
                continue
            now = trio.current_time()
            for t, proto in timers:
                if t is not None and t <= now:
                    proto.handle_timer(now)
                    self._deliver(proto)
                    await self._flush(proto)

    def statistics(self) -> dict[str, Any]:
        return {f"{a[0]}:{a[1]}": dict(p.counters) for p, a in self._protocols.values()}


@asynccontextmanager
async def open_tracker_client(ep: Any, *, retry_base: float = DEFAULT_RETRY_BASE,
                              max_retries: int = DEFAULT_MAX_RETRIES,
                              rng: random.Random | None = None) -> AsyncIterator[TrackerClient]:
    """A :class:`TrackerClient` on Endpoint ``ep`` for the duration of the
    block (it takes the Endpoint's ``"tracker"`` datagram queue; ``rng``:
    see :class:`TrackerClient`).

    Resource handling: leaving the block stops its tasks; requests still
    waiting are cancelled."""
    queue = ep.datagram_queue("tracker")
    client = TrackerClient(ep, retry_base=retry_base, max_retries=max_retries, rng=rng)
    try:
        # The nursery is ours, not the caller's: an exception from the
        # caller's block comes out as itself (newer trio wraps it).
        async with unwrapped(), trio.open_nursery() as nursery:
            nursery.start_soon(client._receive_loop, queue)
            nursery.start_soon(client._timer_loop)
            try:
                yield client
            finally:
                nursery.cancel_scope.cancel()
    finally:
        # Closes the queue and lets a later client register.
        ep.release_datagram_queue(queue)
