"""The BEP 10 extension registry: which extensions a session speaks, under
which message ids, and one handler object per extension per connection.

BEP 10 lets each side pick its own ids: our extension handshake's ``m``
maps each name to the id *we* want to receive it under, the peer's maps
them to the ids *it* wants.  The registry holds the session-wide part
(name, our id, how to make a handler); :class:`PeerExtensions` is one
connection's part (the handlers, our handshake, dispatch of incoming
:class:`bt.wire.Extended` messages by the name the peer-wire core resolved
from our id, and the messages the handlers queued).

An extension plugs in like wsproto's ``Extension``::

    class Echo(Extension):
        name = "x_echo"
        def handler(self, peer):          # None: not on this connection
            return EchoHandler()

    class EchoHandler(ExtensionHandler):
        name = "x_echo"
        def receive_untrusted(self, payload, now):
            self.send_payload(payload)

    registry.register(Echo(), local_id=7)

Handlers are sans-I/O: payloads and ``now`` in, payloads out (through
:meth:`ExtensionHandler.send_payload`), an optional timer.  A handler that
finds a payload malformed raises :class:`RemoteProtocolError`; the
connection then ends with :attr:`bt.wire.Violation.BAD_EXTENDED`.  The
peer-wire core already rejects ids we never offered.
"""

from __future__ import annotations

import ipaddress
from typing import Any, Iterable, Mapping

from _utpkit.errors import LocalProtocolError, RemoteProtocolError

from .wire import MAX_EXTENDED_LEN, Extended, ExtensionHandshake, Violation, WireError

__all__ = ["Extension", "ExtensionHandler", "ExtensionRegistry", "PeerExtensions",
           "DEFAULT_IDS"]

#: The ids libtorrent offers for the extensions we speak (measured in its
#: handshakes): using the same numbers costs nothing and makes captures of
#: the two clients easy to compare.  Any id in 1..255 is valid.
DEFAULT_IDS: dict[str, int] = {"ut_pex": 1, "ut_metadata": 2, "ut_holepunch": 4}


class ExtensionHandler:
    """One extension on one connection (subclass it).

    ``peer_supports`` becomes True once the peer's extension handshake
    names the extension with a non-zero id; a handler only sends after
    that (:meth:`send_payload` raises LocalProtocolError before)."""

    #: The extension's name, as in the handshake's ``m`` (set by subclasses).
    name: str = ""

    def __init__(self) -> None:
        self.peer_supports = False
        self._out: list[bytes] = []

    # ---- what subclasses override ------------------------------------------------------

    def handshake_fields(self) -> Mapping[bytes, Any]:
        """Keys this extension adds to our extension handshake (e.g.
        ``metadata_size`` for ut_metadata).  Called when the handshake is
        built, so the values may change over a torrent's life."""
        return {}

    def on_handshake(self, hs: ExtensionHandshake, now: float) -> None:
        """The peer's extension handshake (again, if it sends another).
        ``peer_supports`` is already updated."""

    def receive_untrusted(self, payload: bytes, now: float) -> None:
        """A message of this extension from the peer.  Raise
        RemoteProtocolError when it is malformed."""

    def get_timer(self) -> float | None:
        """When :meth:`handle_timer` wants to run next (None: never)."""
        return None

    def handle_timer(self, now: float) -> None:
        """Timeouts, periodic messages."""

    def close(self) -> None:
        """The connection ended: give back whatever it held."""

    # ---- for subclasses ------------------------------------------------------------------

    def send_payload(self, payload: bytes) -> None:
        """Queue one message of this extension for the peer."""
        if not self.peer_supports:
            raise LocalProtocolError(f"the peer does not support {self.name}")
        if len(payload) > MAX_EXTENDED_LEN:
            raise LocalProtocolError(f"{self.name} message of {len(payload)} bytes exceeds "
                                     f"{MAX_EXTENDED_LEN}")
        self._out.append(payload)

    def take_payloads(self) -> list[bytes]:
        out, self._out = self._out, []
        return out


class Extension:
    """A BEP 10 extension as the session knows it (subclass it): its
    ``name`` and a factory of per-connection handlers."""

    name: str = ""

    def handler(self, peer: Any) -> ExtensionHandler | None:
        """A handler for the connection ``peer`` (a :class:`bt.peer.PeerConnection`
        in the session; anything in a test), or None to leave this
        extension out of that connection's handshake (e.g. PEX on a
        private torrent)."""
        raise NotImplementedError


class ExtensionRegistry:
    """The extensions a session offers, each with our message id."""

    def __init__(self, extensions: Iterable[Extension] = ()) -> None:
        self._by_name: dict[str, tuple[Extension, int]] = {}
        for ext in extensions:
            self.register(ext)

    def register(self, ext: Extension, local_id: int | None = None) -> int:
        """Add ``ext`` under ``local_id`` (default: libtorrent's id for a
        known name, else the lowest free id).  Returns the id.
        LocalProtocolError when the name or the id is taken."""
        if not ext.name or not isinstance(ext.name, str):
            raise LocalProtocolError(f"extension {ext!r} has no name")
        if ext.name in self._by_name:
            raise LocalProtocolError(f"extension {ext.name!r} is already registered")
        used = {i for _, i in self._by_name.values()}
        if local_id is None:
            local_id = DEFAULT_IDS.get(ext.name)
            if local_id is None or local_id in used:
                local_id = next(i for i in range(1, 256) if i not in used and
                                i not in DEFAULT_IDS.values())
        if type(local_id) is not int or not 0 < local_id < 256:
            raise LocalProtocolError(f"extension id must be in 1..255, not {local_id!r}")
        if local_id in used:
            raise LocalProtocolError(f"extension id {local_id} is already taken")
        self._by_name[ext.name] = (ext, local_id)
        return local_id

    def unregister(self, name: str) -> None:
        """Offer ``name`` no more on new connections."""
        self._by_name.pop(name, None)

    def get(self, name: str) -> Extension | None:
        entry = self._by_name.get(name)
        return entry[0] if entry is not None else None

    def local_id(self, name: str) -> int | None:
        entry = self._by_name.get(name)
        return entry[1] if entry is not None else None

    @property
    def names(self) -> list[str]:
        return list(self._by_name)

    def connection(self, peer: Any) -> "PeerExtensions":
        """The extensions of one new connection (each extension decides
        whether it takes part)."""
        handlers: dict[str, tuple[ExtensionHandler, int]] = {}
        for name, (ext, local_id) in self._by_name.items():
            h = ext.handler(peer)
            if h is not None:
                h.name = h.name or name
                handlers[name] = (h, local_id)
        return PeerExtensions(handlers)


def _compact_ip(host: Any) -> bytes | None:
    try:
        addr = ipaddress.ip_address(str(host).split("%")[0])
    except ValueError:
        return None
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.packed


class PeerExtensions:
    """One connection's extension handlers (see the module docstring)."""

    def __init__(self, handlers: Mapping[str, tuple[ExtensionHandler, int]]) -> None:
        self._handlers = dict(handlers)
        self.peer_handshake: ExtensionHandshake | None = None

    def __contains__(self, name: str) -> bool:
        return name in self._handlers

    def get(self, name: str) -> ExtensionHandler | None:
        entry = self._handlers.get(name)
        return entry[0] if entry is not None else None

    def handlers(self) -> list[ExtensionHandler]:
        return [h for h, _ in self._handlers.values()]

    def handshake(self, *, v: str | None = None, p: int | None = None, reqq: int | None = None,
                  peer_addr: tuple[Any, ...] | None = None) -> ExtensionHandshake:
        """Our extension handshake: ``m`` from the handlers, their fields,
        and ``yourip`` (the peer's address as we see it: BEP 10's vote for
        its external address) when ``peer_addr`` is given."""
        fields: dict[bytes, Any] = {}
        for h, _ in self._handlers.values():
            fields.update(h.handshake_fields())
        metadata_size = fields.pop(b"metadata_size", None)
        yourip = _compact_ip(peer_addr[0]) if peer_addr is not None else None
        return ExtensionHandshake(m={name: i for name, (_, i) in self._handlers.items()},
                                  v=v, p=p, reqq=reqq, yourip=yourip,
                                  metadata_size=metadata_size, extra=fields)

    def on_handshake(self, hs: ExtensionHandshake, now: float) -> None:
        """The peer's extension handshake: which of ours it speaks."""
        self.peer_handshake = hs
        for name, (h, _) in self._handlers.items():
            h.peer_supports = bool(hs.m.get(name))
            self._guard(h.on_handshake, hs, now)

    def on_extended(self, ev: Extended, now: float) -> None:
        """An extension message (``ev.name`` resolved by the core).
        WireError(BAD_EXTENDED) when the handler finds it malformed."""
        entry = self._handlers.get(ev.name)
        if entry is None:
            # an id we offered in an earlier handshake and withdrew since
            raise WireError(Violation.BAD_EXTENDED, f"message for extension {ev.name!r} "
                            f"we do not speak on this connection")
        self._guard(entry[0].receive_untrusted, bytes(ev.payload), now)

    def _guard(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except RemoteProtocolError as exc:
            if isinstance(exc, WireError):
                raise
            raise WireError(Violation.BAD_EXTENDED, str(exc)) from None

    def outgoing(self) -> list[Extended]:
        """What the handlers queued, as messages for ``PeerWire.send``
        (the core fills in the peer's ids by name)."""
        out = []
        for name, (h, _) in self._handlers.items():
            for payload in h.take_payloads():
                out.append(Extended(0, payload, name))
        return out

    def get_timer(self) -> float | None:
        timers = [t for h in self.handlers() if (t := h.get_timer()) is not None]
        return min(timers) if timers else None

    def handle_timer(self, now: float) -> None:
        for h in self.handlers():
            t = h.get_timer()
            if t is not None and now >= t:
                self._guard(h.handle_timer, now)

    def close(self) -> None:
        for h in self.handlers():
            h.close()
