"""JSON-RPC 2.0 as aria2 speaks it: a pure layer, bytes in and bytes out,
no sockets, so every answer can be tested without a server.

aria2's conventions, checked against aria2c 1.36 on loopback:

- every request needs an ``id`` (a notification, without one, gets
  ``-32600 Invalid Request.``); a batch is a JSON array of requests and
  answers an array (``[]`` for ``[]``);
- errors of a method are ``{"code": 1, "message": ...}`` with HTTP status
  400: ``Unauthorized``, ``No such method: X``, ``GID X is not found``,
  ``The parameter at N has wrong type.``, ``The parameter at N is required
  but missing.``; malformed JSON is ``-32700 Parse error.`` with HTTP 500;
- the secret is the first parameter, ``"token:SECRET"``; a ``token:``
  parameter is stripped also when no secret is set; ``system.listMethods``
  and ``system.listNotifications`` answer without it (aria2 1.36 does);
- ``system.multicall`` takes ``[{"methodName": ..., "params": [...]}, ...]``
  and answers each call with ``[result]`` or the error object, each call
  checking its own token;
- GET ``/jsonrpc?method=M&id=I&params=BASE64`` (the params array as
  base64 JSON, URL-safe or not), and with ``jsoncallback=F`` the answer is
  JavaScript ``F(...)`` (JSONP), as aria2 does.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import re
from dataclasses import dataclass
from typing import Any, Awaitable, Callable, Mapping

__all__ = ["RpcError", "Params", "Dispatcher", "Method", "PARSE_ERROR", "INVALID_REQUEST",
           "INVALID_PARAMS", "ARIA2_ERROR", "encode_notification"]

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
INVALID_PARAMS = -32602
#: aria2 answers every error of a method with code 1 and a message.
ARIA2_ERROR = 1

_MESSAGES = {PARSE_ERROR: "Parse error.", INVALID_REQUEST: "Invalid Request.",
             INVALID_PARAMS: "Invalid params."}
_JSONP_NAME = re.compile(r"[A-Za-z_$][\w$.]{0,63}")


class RpcError(Exception):
    """An error answer: ``code`` and ``message`` go to the client as is."""

    def __init__(self, message: str, code: int = ARIA2_ERROR) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def as_json(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message}


class Params:
    """A method's positional parameters (the token already removed), with
    aria2's messages for a missing or mistyped one."""

    def __init__(self, values: list[Any]) -> None:
        self.values = values

    def __len__(self) -> int:
        return len(self.values)

    def get(self, index: int, kind: type | tuple[type, ...], default: Any = ...) -> Any:
        """Parameter ``index`` of type ``kind``; ``default`` when absent
        (if given, else the "required but missing" error).  A bool never
        passes for an int."""
        if index >= len(self.values):
            if default is ...:
                raise RpcError(f"The parameter at {index} is required but missing.")
            return default
        value = self.values[index]
        if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
            raise RpcError(f"The parameter at {index} has wrong type.")
        return value

    def strings(self, index: int, default: Any = ...) -> list[str]:
        """Parameter ``index`` as a list of strings (``keys``, ``uris``)."""
        value = self.get(index, list, default)
        if value is not default and not all(isinstance(v, str) for v in value):
            raise RpcError(f"The parameter at {index} has wrong type.")
        return value

    def options(self, index: int) -> dict[str, str]:
        """Parameter ``index`` as an option struct (absent: empty); values
        are strings as aria2 wants them (numbers are accepted and turned
        into strings, as aria2 does)."""
        value = self.get(index, dict, {})
        out: dict[str, str] = {}
        for k, v in value.items():
            if isinstance(v, bool) or not isinstance(v, (str, int, float)):
                raise RpcError(f"The parameter at {index} has wrong type.")
            out[k] = v if isinstance(v, str) else str(v)
        return out


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


#: A method: an async function of its parameters (token removed).
Method = Callable[[Params], Awaitable[Any]]


@dataclass(frozen=True, slots=True)
class Answer:
    """What the transport sends: HTTP status, body, content type."""
    status: int
    body: bytes
    content_type: str = "application/json-rpc"


def _dumps(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False).encode()


def encode_notification(method: str, gid: str) -> bytes:
    """A WebSocket notification as aria2 sends it."""
    return _dumps({"jsonrpc": "2.0", "method": method, "params": [{"gid": gid}]})


class Dispatcher:
    """Routes requests to ``methods``; ``secret`` (None: none) is checked
    in constant time.  ``notifications`` are what system.listNotifications
    names."""

    #: Methods answered without the token (as aria2 1.36).
    PUBLIC = frozenset({"system.listMethods", "system.listNotifications"})

    def __init__(self, methods: Mapping[str, Method], *, secret: str | None = None,
                 notifications: tuple[str, ...] = ()) -> None:
        self.methods = dict(methods)
        self.secret = secret
        self.notifications = notifications
        self.methods["system.listMethods"] = self._list_methods
        self.methods["system.listNotifications"] = self._list_notifications
        self.methods["system.multicall"] = self._multicall

    async def _list_methods(self, params: Params) -> list[str]:
        return list(self.methods)

    async def _list_notifications(self, params: Params) -> list[str]:
        return list(self.notifications)

    async def _multicall(self, params: Params) -> list[Any]:
        calls = params.get(0, list)
        out: list[Any] = []
        for call in calls:
            if not isinstance(call, dict) or not isinstance(call.get("methodName"), str):
                out.append(RpcError("system.multicall expected struct.").as_json())
                continue
            if call["methodName"] == "system.multicall":
                out.append(RpcError("Recursive system.multicall forbidden.").as_json())
                continue
            inner = call.get("params", [])
            if not isinstance(inner, list):
                out.append(RpcError("Missing params.").as_json())
                continue
            try:
                out.append([await self.call(call["methodName"], inner)])
            except RpcError as exc:
                out.append(exc.as_json())
        return out

    def _authorize(self, method: str, params: list[Any]) -> list[Any]:
        """The parameters without the token; RpcError if the secret is set
        and the token is missing or wrong."""
        token: str | None = None
        if params and isinstance(params[0], str) and params[0].startswith("token:"):
            token = params[0][6:]
            params = params[1:]
        if self.secret is not None and method not in self.PUBLIC and method != "system.multicall":
            if token is None or not hmac.compare_digest(token.encode(), self.secret.encode()):
                raise RpcError("Unauthorized")
        return params

    async def call(self, method: str, params: list[Any]) -> Any:
        """Run one method; RpcError for every failure a client may cause."""
        fn = self.methods.get(method)
        if fn is None:
            # aria2 checks the token first: an unauthorized caller learns nothing
            self._authorize("", params)
            raise RpcError(f"No such method: {method}")
        return await fn(Params(self._authorize(method, params)))

    async def _one(self, req: Any) -> dict[str, Any]:
        if not isinstance(req, dict):
            return _error(None, RpcError(_MESSAGES[INVALID_REQUEST], INVALID_REQUEST))
        rid = req.get("id")
        method = req.get("method")
        params = req.get("params", [])
        if "id" not in req or not isinstance(method, str) \
                or isinstance(rid, (dict, list, bool)):
            return _error(rid if isinstance(rid, (str, int, float)) and not isinstance(rid, bool)
                          else None, RpcError(_MESSAGES[INVALID_REQUEST], INVALID_REQUEST))
        if not isinstance(params, list):
            return _error(rid, RpcError(_MESSAGES[INVALID_PARAMS], INVALID_PARAMS))
        try:
            result = await self.call(method, params)
        except RpcError as exc:
            return _error(rid, exc)
        return {"id": rid, "jsonrpc": "2.0", "result": result}

    async def handle(self, body: bytes) -> Answer:
        """A POST body (or a WebSocket text message): one request or a
        batch."""
        try:
            req = json.loads(body)
        except (ValueError, UnicodeDecodeError, RecursionError):
            return Answer(500, _dumps(_error(None, RpcError(_MESSAGES[PARSE_ERROR], PARSE_ERROR))))
        if isinstance(req, list):
            answers = [await self._one(r) for r in req]
            return Answer(200, _dumps(answers))
        answer = await self._one(req)
        return Answer(_http_status(answer), _dumps(answer))

    async def handle_get(self, query: Mapping[str, str]) -> Answer:
        """GET /jsonrpc?method=&id=&params=BASE64[&jsoncallback=F]."""
        callback = query.get("jsoncallback")
        if callback is not None and not _JSONP_NAME.fullmatch(callback):
            callback = None
        params: Any = []
        raw = query.get("params")
        answer: dict[str, Any]
        try:
            if raw:
                padded = raw + "=" * (-len(raw) % 4)
                alt = b"-_" if ("-" in raw or "_" in raw) else None
                params = json.loads(base64.b64decode(padded, altchars=alt, validate=True))
        except (ValueError, binascii.Error, UnicodeDecodeError, RecursionError):
            answer = _error(None, RpcError(_MESSAGES[PARSE_ERROR], PARSE_ERROR))
        else:
            req: dict[str, Any] = {"jsonrpc": "2.0", "params": params}
            if "method" in query:
                req["method"] = query["method"]
            if "id" in query:
                req["id"] = query["id"]
            if isinstance(params, list) and params and isinstance(params[0], dict) \
                    and "method" not in query:
                answer = _error(None, RpcError(_MESSAGES[INVALID_REQUEST], INVALID_REQUEST))
            else:
                answer = await self._one(req)
        status = 500 if answer.get("error", {}).get("code") == PARSE_ERROR else _http_status(answer)
        if callback is not None:
            return Answer(200, callback.encode() + b"(" + _dumps(answer) + b")", "text/javascript")
        return Answer(status, _dumps(answer))


def _error(rid: Any, exc: RpcError) -> dict[str, Any]:
    return {"id": rid, "jsonrpc": "2.0", "error": exc.as_json()}


def _http_status(answer: dict[str, Any]) -> int:
    err = answer.get("error")
    if err is None:
        return 200
    return 500 if err["code"] == PARSE_ERROR else 400
