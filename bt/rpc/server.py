"""The RPC transport: HTTP POST/GET and WebSocket on ``/jsonrpc``, and the
status page on ``/``, all on one port.

Served by hypercorn's trio worker around a small ASGI app (see
pyproject.toml for why).  Requests go to a :class:`bt.rpc.jsonrpc.
Dispatcher`; notifications are pushed to every WebSocket client through a
bounded queue of its own: a client that does not read (its queue full) is
closed and counted, so a slow client never holds up the session or the
other clients.

Limits: a request body (or WebSocket message) over ``max_body`` bytes is
refused (HTTP 413, or the socket closed with 1009); at most
``max_ws_clients`` WebSockets at once (more are refused with HTTP 403);
a WebSocket whose ``Origin`` names another host is refused unless
``allow_origin_all`` (a web page elsewhere must not drive the daemon
through its user's browser); CORS headers only with ``allow_origin_all``
(aria2's ``--rpc-allow-origin-all``).
"""

from __future__ import annotations

import collections
import functools
import logging
import socket
import urllib.parse
from typing import Any, Awaitable, Callable

import trio

from .jsonrpc import Answer, Dispatcher, RpcError, encode_notification

__all__ = ["RpcServer", "MAX_BODY", "MAX_WS_CLIENTS", "WS_QUEUE"]

log = logging.getLogger("bt.rpc")

#: aria2's --rpc-max-request-size default (2 MiB).
MAX_BODY = 2 * 1024 * 1024
MAX_WS_CLIENTS = 64
#: Messages queued for one WebSocket client before it counts as too slow.
WS_QUEUE = 1024
#: Seconds between WebSocket pings, and without a byte from a connection
#: before it is closed (idle HTTP keep-alives close sooner, after 5 s).
PING_INTERVAL = 15.0
READ_TIMEOUT = 45
#: Seconds a connection's sent data may stay unacknowledged -- including a
#: zero receive window, a client that stopped reading -- before the
#: kernel aborts it (TCP_USER_TIMEOUT on the listening socket, inherited
#: by every connection): hypercorn writes with the socket send shielded
#: from cancellation, so this is what ends a send stuck on such a client.
SEND_TIMEOUT = 30.0

_METHODS = frozenset({"GET", "HEAD", "POST", "OPTIONS", "PUT", "DELETE", "PATCH"})
Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]


class _Client:
    def __init__(self, queue: int) -> None:
        self.send, self.recv = trio.open_memory_channel[bytes](queue)
        self.closed = False
        self.scope: trio.CancelScope | None = None


class RpcServer:
    """The ASGI app (:meth:`__call__`) and :meth:`serve`.  ``page`` is the
    status page's HTML (None: no page)."""

    def __init__(self, dispatcher: Dispatcher, *, page: bytes | None = None,
                 max_body: int = MAX_BODY, max_ws_clients: int = MAX_WS_CLIENTS,
                 ws_queue: int = WS_QUEUE, allow_origin_all: bool = False,
                 ping_interval: float = PING_INTERVAL, read_timeout: int = READ_TIMEOUT,
                 send_timeout: float = SEND_TIMEOUT) -> None:
        self.dispatcher = dispatcher
        self.page = page
        self.max_body = max_body
        self.max_ws_clients = max_ws_clients
        self.ws_queue = ws_queue
        self.allow_origin_all = allow_origin_all
        self.ping_interval = ping_interval
        self.read_timeout = read_timeout
        self.send_timeout = send_timeout
        self.clients: set[_Client] = set()
        self.counters: collections.Counter[str] = collections.Counter()
        self.bound: list[str] = []

    # ---- notifications -----------------------------------------------------------------

    def broadcast(self, method: str, gid: str) -> None:
        """Queue a notification for every WebSocket client; never blocks.
        A client whose queue is full is dropped (closed)."""
        msg = encode_notification(method, gid)
        self.counters["notifications"] += 1
        for c in list(self.clients):
            self._queue(c, msg)

    def _queue(self, c: _Client, msg: bytes) -> None:
        if c.closed:
            return
        try:
            c.send.send_nowait(msg)
        except trio.WouldBlock:
            self.counters["ws.dropped_slow"] += 1
            c.closed = True
            c.send.close()
            self.clients.discard(c)     # no longer counted or sent to
            if c.scope is not None:
                c.scope.cancel()
            # hypercorn writes with its socket send shielded: a sender stuck on
            # a full socket ends when the kernel gives up on the connection
            # (SEND_TIMEOUT) or its read timeout closes it (a client that does
            # not read answers no ping): see serve()
        except trio.ClosedResourceError:
            c.closed = True

    # ---- ASGI --------------------------------------------------------------------------

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "http":
            await self._http(scope, receive, send)
        elif kind == "websocket":
            await self._websocket(scope, receive, send)
        elif kind == "lifespan":
            while True:
                msg = await receive()
                if msg["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif msg["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return

    def _headers(self, content_type: str, length: int) -> list[tuple[bytes, bytes]]:
        h = [(b"content-type", content_type.encode()), (b"content-length", str(length).encode()),
             (b"cache-control", b"no-cache")]
        if self.allow_origin_all:
            h.append((b"access-control-allow-origin", b"*"))
        return h

    async def _respond(self, send: Send, status: int, body: bytes,
                       content_type: str = "application/json-rpc") -> None:
        await send({"type": "http.response.start", "status": status,
                    "headers": self._headers(content_type, len(body))})
        await send({"type": "http.response.body", "body": body})

    async def _read_body(self, scope: Scope, receive: Receive) -> bytes | None:
        for name, value in scope.get("headers", []):
            if name == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return None
                except ValueError:
                    return None
        body = bytearray()
        while True:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return bytes(body)
            body += msg.get("body", b"")
            if len(body) > self.max_body:
                return None
            if not msg.get("more_body"):
                return bytes(body)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        path, method = scope["path"], scope["method"]
        self.counters[f"http.{method}" if method in _METHODS else "http.other"] += 1
        if path == "/jsonrpc" and method == "POST":
            body = await self._read_body(scope, receive)
            if body is None:
                self.counters["http.too_large"] += 1
                err = RpcError(f"Request too large (limit {self.max_body} bytes)", -32600)
                await self._respond(send, 413, (b'{"id":null,"jsonrpc":"2.0","error":'
                                                + _json(err.as_json()) + b"}"))
                return
            answer = await self.dispatcher.handle(body)
            await self._respond(send, answer.status, answer.body, answer.content_type)
        elif path == "/jsonrpc" and method == "GET":
            query = dict(urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"),
                                                keep_blank_values=True))
            answer = await self.dispatcher.handle_get(query)
            await self._respond(send, answer.status, answer.body, answer.content_type)
        elif path == "/jsonrpc" and method == "OPTIONS" and self.allow_origin_all:
            await send({"type": "http.response.start", "status": 200, "headers": [
                (b"access-control-allow-origin", b"*"),
                (b"access-control-allow-methods", b"POST, GET, OPTIONS"),
                (b"access-control-allow-headers", b"Content-Type"),
                (b"access-control-max-age", b"1728000"), (b"content-length", b"0")]})
            await send({"type": "http.response.body", "body": b""})
        elif path in ("/", "/index.html") and method in ("GET", "HEAD") and self.page is not None:
            await self._respond(send, 200, self.page, "text/html; charset=utf-8")
        else:
            await self._respond(send, 404, b"not found\n", "text/plain")

    def _origin_ok(self, scope: Scope) -> bool:
        if self.allow_origin_all:
            return True
        headers = dict(scope.get("headers", []))
        origin = headers.get(b"origin")
        if origin is None:
            return True                     # not a browser
        host = headers.get(b"host", b"").decode("latin-1")
        parsed = urllib.parse.urlsplit(origin.decode("latin-1"))
        return parsed.netloc == host

    async def _websocket(self, scope: Scope, receive: Receive, send: Send) -> None:
        msg = await receive()
        if msg["type"] != "websocket.connect":
            return
        if scope["path"] != "/jsonrpc" or not self._origin_ok(scope):
            self.counters["ws.refused_origin"] += 1
            await send({"type": "websocket.close", "code": 1008})
            return
        if len(self.clients) >= self.max_ws_clients:
            self.counters["ws.refused_full"] += 1
            await send({"type": "websocket.close", "code": 1013})
            return
        await send({"type": "websocket.accept"})
        client = _Client(self.ws_queue)
        self.clients.add(client)
        self.counters["ws.accepted"] += 1
        try:
            async with trio.open_nursery() as nursery:
                client.scope = nursery.cancel_scope
                nursery.start_soon(self._ws_sender, client, send, nursery.cancel_scope)
                while True:
                    msg = await receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    if msg["type"] != "websocket.receive":
                        continue
                    data = msg.get("text")
                    raw = data.encode() if data is not None else (msg.get("bytes") or b"")
                    if len(raw) > self.max_body:
                        self.counters["ws.too_large"] += 1
                        client.closed = True
                        client.send.close()
                        break
                    answer: Answer = await self.dispatcher.handle(raw)
                    self._queue(client, answer.body)
                    if client.closed:
                        break
                client.closed = True
                client.send.close()
        finally:
            self.clients.discard(client)
            self.counters["ws.ended"] += 1

    async def _ws_sender(self, client: _Client, send: Send, scope: trio.CancelScope) -> None:
        try:
            async for msg in client.recv:
                await send({"type": "websocket.send", "text": msg.decode()})
            await send({"type": "websocket.close", "code": 1000})
        except Exception:            # the socket went away under us
            self.counters["ws.send_failed"] += 1
        scope.cancel()

    # ---- serving -----------------------------------------------------------------------

    async def serve(self, host: str, port: int, *,
                    task_status: trio.TaskStatus[list[str]] = trio.TASK_STATUS_IGNORED) -> None:
        """Serve until cancelled; ``task_status`` gets the bound URLs
        (``http://127.0.0.1:6800``)."""
        from hypercorn.config import Config
        from hypercorn.trio import serve
        config = Config()
        # hypercorn adopts the descriptor (and closes it when done)
        config.bind = [f"fd://{_listening_socket(host, port, self.send_timeout).detach()}"]
        config.accesslog = None
        config.errorlog = logging.getLogger("bt.rpc.http")
        config.websocket_max_message_size = self.max_body
        config.h11_max_incomplete_size = 64 * 1024
        config.graceful_timeout = 1.0
        config.include_server_header = False
        # A WebSocket client that stops reading stops answering pings too:
        # with nothing read from it for READ_TIMEOUT its connection is
        # closed, which also frees a send stuck on its full socket.  Any
        # live client (browsers, websocket-client, trio-websocket) answers
        # pings by itself.
        config.websocket_ping_interval = self.ping_interval
        config.read_timeout = self.read_timeout
        async with trio.open_nursery() as nursery:
            self.bound = await nursery.start(
                functools.partial(serve, self, config, mode="asgi"))  # type: ignore[arg-type]
            task_status.started(self.bound)


def _listening_socket(host: str, port: int, send_timeout: float) -> socket.socket:
    """A listening TCP socket on host:port with TCP_USER_TIMEOUT set (see
    SEND_TIMEOUT); OSError if it cannot bind."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, addr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if hasattr(socket, "TCP_USER_TIMEOUT"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT, int(send_timeout * 1000))
        sock.bind(addr)
        sock.listen(128)
    except OSError:
        sock.close()
        raise
    return sock


def _json(obj: Any) -> bytes:
    import json
    return json.dumps(obj, separators=(",", ":")).encode()

