"""aria2-compatible JSON-RPC for a :class:`bt.session.Session`, over HTTP
and WebSocket, with a status page: what ``bt daemon`` serves.

- :mod:`bt.rpc.jsonrpc`: JSON-RPC 2.0 as aria2 speaks it (errors, token,
  batches, ``system.multicall``, GET with base64 params), bytes in and
  bytes out, no sockets;
- :mod:`bt.rpc.status`: aria2's status structs from a torrent;
- :mod:`bt.rpc.aria2`: the ``aria2.*`` methods over a session (gids,
  stopped results, magnets' two steps, options);
- :mod:`bt.rpc.server`: the ASGI app on hypercorn's trio worker (HTTP,
  WebSocket notifications, limits) and :mod:`bt.rpc.page`, the page;
- :mod:`bt.rpc.sessionfile` and :mod:`bt.rpc.daemon`: ``bt daemon``.
"""

from .aria2 import NOTIFICATIONS, Aria2Api, Download
from .jsonrpc import Dispatcher, Params, RpcError

__all__ = ["Aria2Api", "Download", "Dispatcher", "Params", "RpcError", "NOTIFICATIONS"]
