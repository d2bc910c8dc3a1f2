"""Public entry points: open_endpoint, open_utp_stream, serve_utp."""

from __future__ import annotations

import socket as _socket
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

import trio

from _utpkit.excgroup import unwrapped

from ._endpoint import Endpoint, endpoint_on_socket, make_udp_endpoint
from ._stream import UTPListener, UTPStream

__all__ = ["open_endpoint", "open_utp_stream", "serve_utp", "run_endpoint", "adopt_socket"]


@asynccontextmanager
async def run_endpoint(ep: Endpoint) -> AsyncIterator[Endpoint]:
    """Runs an already built Endpoint (a real or simulated driver) in a
    nursery for the duration of the block; on a normal exit it closes every
    connection gracefully (lingering up to ``ep.linger`` seconds for their
    FIN exchanges), on an exception or cancellation at once.  Exceptions
    from the block come out unwrapped (the Endpoint's nursery is an
    implementation detail; newer trio wraps what a nursery raises)."""
    try:
        async with unwrapped(), trio.open_nursery() as nursery:
            run_scope = await nursery.start(ep.run)
            try:
                yield ep
            except BaseException:
                run_scope.cancel()
                raise
            with trio.CancelScope(shield=True):
                await ep.shutdown()
            run_scope.cancel()
    finally:
        ep.close_now()


@asynccontextmanager
async def open_endpoint(host: str | None = None, port: int = 0, *, family: int | None = None,
                        recv_buffer: int | None = None, send_buffer: int | None = None,
                        socket_buffer: int | None = None, linger: float = 10.0,
                        udp_mtu: int | None = None,
                        options: dict[int, int] | None = None) -> AsyncIterator[Endpoint]:
    """Bind one UDP socket and run a uTP :class:`Endpoint` on it.

    ``host`` None binds the dual-stack wildcard (``::`` accepting IPv4 too)
    where the machine has IPv6, else ``0.0.0.0``; a literal address binds
    just that address and family.  ``recv_buffer`` / ``send_buffer`` are each
    connection's receive window and send buffer in bytes (engine defaults:
    1 MiB); ``socket_buffer`` the kernel socket buffers to ask for (default:
    as large as ``net.core.rmem_max`` / ``wmem_max`` allow, up to 8 MiB; the
    granted sizes are in ``statistics()``).  ``udp_mtu`` is the largest UDP
    payload to use (default 1402 for IPv4, 1232 for IPv6; above that the
    engine probes the path).  ``options`` sets engine options
    (:class:`utp.Option` ids) before anything is sent.

    Resource handling: the socket and the Endpoint's tasks belong to this
    block.  Leaving it normally closes every connection gracefully and waits
    up to ``linger`` seconds for the peers to acknowledge what was sent;
    leaving with an exception (or cancellation) closes at once.
    """
    ep = make_udp_endpoint(host, port, family=family, recv_buffer=recv_buffer,
                           send_buffer=send_buffer, socket_buffer=socket_buffer, linger=linger,
                           udp_mtu=udp_mtu, options=options)
    async with run_endpoint(ep) as running:
        yield running


async def _resolve(host: str, port: int, numeric: bool) -> tuple[int, tuple[Any, ...]]:
    if not isinstance(port, int) or isinstance(port, bool):
        raise TypeError(f"port must be an int, not {type(port).__name__} {port!r}")
    if not 1 <= port <= 65535:
        raise OSError(f"bad port {port!r}: expected 1..65535")
    flags = _socket.AI_NUMERICHOST if numeric else 0
    try:
        infos = await trio.socket.getaddrinfo(host, port, type=_socket.SOCK_DGRAM, flags=flags)
    except _socket.gaierror as exc:
        raise OSError(f"cannot resolve {host!r}: {exc.strerror}") from None
    for family in (_socket.AF_INET, _socket.AF_INET6):
        for fam, _, _, _, sockaddr in infos:
            if fam == family:
                return fam, sockaddr
    raise OSError(f"{host!r} has no IPv4 or IPv6 address")


class _OwnedEndpoint:
    """An Endpoint that belongs to one stream (open_utp_stream): its tasks run
    as trio system tasks and it shuts down after the stream is closed."""

    def __init__(self, ep: Endpoint) -> None:
        self.ep = ep
        self.scope = trio.CancelScope()
        self.done = trio.Event()

    async def run(self) -> None:
        try:
            with self.scope:
                await self.ep.run()
        finally:
            self.ep.close_now()
            self.done.set()

    async def shutdown(self) -> None:
        with trio.CancelScope(shield=True):
            await self.ep.shutdown()
        self.scope.cancel()
        await self.done.wait()


class _OwningStream(UTPStream):
    """A UTPStream whose aclose() also shuts its private Endpoint down, after
    waiting (up to ``linger``) for the data to be acknowledged."""

    _owner: _OwnedEndpoint

    async def aclose(self) -> None:
        try:
            await super().aclose()
        finally:
            await self._owner.shutdown()


async def open_utp_stream(host: str, port: int, *, local_address: str | None = None,
                          local_port: int = 0, connect_timeout: float = 10.0,
                          attempt_timeout: float = 2.0, numeric_host: bool = False,
                          **endpoint_options: Any) -> UTPStream:
    """Connect to ``host``:``port`` over uTP, like :func:`trio.open_tcp_stream`.

    The stream gets an Endpoint of its own (bound to ``local_address``:
    ``local_port``, default any), which ``aclose()`` shuts down after the
    peer has acknowledged what was sent (at most ``linger`` seconds).  To
    share one UDP port between many connections use :func:`open_endpoint`.

    Raises ConnectionRefusedError, TimeoutError, or OSError (unresolvable
    host, bad port, address in use) with a message naming the problem.
    """
    family, addr = await _resolve(host, port, numeric_host)
    ep = make_udp_endpoint(local_address, local_port, family=family if local_address is None else None,
                           **_endpoint_kwargs(endpoint_options))
    return await _connect_owned(ep, addr, f"{host}:{port}", attempt_timeout=attempt_timeout,
                                timeout=connect_timeout)


async def adopt_socket(template: Endpoint, sock: trio.socket.SocketType, addr: tuple[Any, ...], *,
                       deadline: float) -> UTPStream:
    """Run a uTP Endpoint on ``sock`` (an already bound UDP socket: the one
    birthday probing met through, utp._birthday) and connect from it to
    ``addr``; the Endpoint takes ``template``'s buffer sizes and linger and
    belongs to the returned stream, whose ``aclose()`` shuts it down (as
    :func:`open_utp_stream`'s).  On failure the socket is closed."""
    ep = endpoint_on_socket(sock, recv_buffer=template.recv_buffer,
                            send_buffer=template.send_buffer, socket_buffer=None,
                            linger=template.linger)
    # One attempt for the whole time: the engine resends its SYN (same
    # connection id) when it or the SYN-ACK is lost.  A second attempt
    # would be a second connection, which the peer, accepting exactly one,
    # refuses -- and the first, abandoned, would be reset.
    left = max(deadline - trio.current_time(), 0.001)
    return await _connect_owned(ep, addr, f"{addr[0]}:{addr[1]}", attempt_timeout=left,
                                deadline=deadline)


async def _connect_owned(ep: Endpoint, addr: tuple[Any, ...], name: str, *,
                         attempt_timeout: float, timeout: float | None = None,
                         deadline: float | None = None) -> UTPStream:
    owner = _OwnedEndpoint(ep)
    trio.lowlevel.spawn_system_task(owner.run, name=f"utp endpoint for {name}")
    try:
        stream = await ep.connect(addr, attempt_timeout=attempt_timeout, timeout=timeout,
                                  deadline=deadline)
    except BaseException:
        owner.scope.cancel()
        with trio.CancelScope(shield=True):
            await owner.done.wait()
        raise
    stream.__class__ = _OwningStream
    stream._owner = owner  # type: ignore[attr-defined]
    return stream


def _endpoint_kwargs(options: dict[str, Any]) -> dict[str, Any]:
    allowed = {"recv_buffer", "send_buffer", "socket_buffer", "linger", "udp_mtu", "options"}
    unknown = set(options) - allowed
    if unknown:
        raise TypeError(f"unexpected keyword argument(s): {', '.join(sorted(unknown))}")
    kwargs: dict[str, Any] = {"recv_buffer": None, "send_buffer": None, "socket_buffer": None,
                              "linger": 10.0, "udp_mtu": None, "options": None}
    kwargs.update(options)
    return kwargs


async def serve_utp(handler: Callable[[UTPStream], Awaitable[Any]], port: int, *,
                    host: str | None = None, handler_nursery: trio.Nursery | None = None,
                    task_status: Any = trio.TASK_STATUS_IGNORED,
                    **endpoint_options: Any) -> None:
    """Accept uTP connections on ``port`` for ever, calling ``handler(stream)``
    for each in its own task, like :func:`trio.serve_tcp`.

    ``task_status.started()`` receives the list of listeners (one
    :class:`UTPListener`; its ``endpoint.local_address`` has the port when
    ``port`` is 0).  Streams are closed when their handler returns.
    """
    async with open_endpoint(host, port, **_endpoint_kwargs(endpoint_options)) as ep:
        listener: UTPListener = ep.listen()
        await trio.serve_listeners(handler, [listener], handler_nursery=handler_nursery,
                                   task_status=task_status)
