"""PEX (BEP 11) and the holepunch extension (BEP 55) in the session: the
:mod:`bt.extensions` handlers around the sans-I/O cores :mod:`bt.pex` and
:mod:`bt.holepunch`, and the punched connection.

What happens:

- every connection of a public torrent speaks ``ut_pex``: at the first
  tick after the peer's extension handshake it gets our connected peers
  (:func:`announce_addr`, flags from what we know of each), then the
  diffs, at most once a minute; what it tells us is dialed like any other
  peer (uTP first).  Private torrents (BEP 27) never use PEX: the handler
  is not created, so ``ut_pex`` is not even offered;
- every connection speaks ``ut_holepunch``.  *Initiator*: when dialing a
  peer learned through PEX fails, a connected peer that listed it and
  speaks ut_holepunch is asked (``rendezvous``).  *Relay*: ``connect`` to
  both when both are connected to us, else error 1-4.  *Both ends* of a
  ``connect``: :meth:`utp.Endpoint.punch` on the session's shared socket
  (its tie-break picks which side sends the SYNs, so exactly one uTP
  connection results) and then the BitTorrent handshake over it, each side
  sending its handshake first (both know the torrent).  The connection is
  marked ``punched`` and counted in ``connections.punched``.

Counters (torrent): ``pex.sent``, ``pex.received``, ``pex.learned``,
``pex.violation.<reason>``, ``holepunch.rendezvous_sent``,
``holepunch.relayed``, ``holepunch.relay_error.<Name>``,
``holepunch.error_received.<Name>``, ``holepunch.connect_received``,
``holepunch.violation.<reason>``; (session) ``holepunch.punched``,
``holepunch.punch_failed``.
"""

from __future__ import annotations

import ipaddress
from typing import TYPE_CHECKING, Any

from .extensions import Extension, ExtensionHandler
from .holepunch import (ERROR_NAMES, HolepunchError, HolepunchMessage, MsgType,
                        encode_holepunch, parse_holepunch_untrusted, relay_error)
from .holepunch import EXTENSION as HOLEPUNCH
from .pex import (FLAG_ENCRYPTION, FLAG_HOLEPUNCH, FLAG_REACHABLE, FLAG_SEED, FLAG_UTP,
                  PexError, PexReceiver, PexSender)
from .pex import EXTENSION as PEX

if TYPE_CHECKING:
    from .peer import PeerConnection
    from .session import Session
    from .torrent import Torrent

__all__ = ["PexExtension", "HolepunchExtension", "install", "announce_addr", "PUNCH_TIMEOUT",
           "punch_and_connect", "try_rendezvous"]

#: How long one punch may take (both sides start within a round trip of
#: the relay's two connect messages; utp.punch paces 0.1 s for 5 s, then
#: keeps the mappings open).
PUNCH_TIMEOUT = 20.0

#: Punches a torrent runs at once: a peer that sends many ``connect``
#: messages (to addresses of its choosing) gets no more probes sent.
MAX_PUNCHES = 8

Addr = tuple[str, int]


def _norm(addr: tuple[Any, ...]) -> Addr:
    ip = ipaddress.ip_address(str(addr[0]).split("%")[0])
    if ip.version == 6 and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return str(ip), int(addr[1])


def announce_addr(p: "PeerConnection") -> Addr | None:
    """Where others can reach the peer of connection ``p``: the address we
    see for a uTP connection (the shared UDP socket: its public mapping)
    or one we dialed; for an incoming TCP connection, the peer's IP with
    the listen port from its extension handshake (None without one)."""
    try:
        if p.transport == "utp" or getattr(p, "outgoing", False):
            return _norm(p.addr)
        hs = p.core.peer_ext_handshake
        if hs is not None and hs.p:
            return _norm((p.addr[0], hs.p))
    except ValueError:
        pass
    return None


def _flags(p: "PeerConnection") -> int:
    f = 0
    if p.transport == "utp":
        f |= FLAG_UTP
    if getattr(p, "outgoing", False):
        f |= FLAG_REACHABLE
    if p.core.peer_extensions.get(HOLEPUNCH):
        f |= FLAG_HOLEPUNCH
    if getattr(p, "encrypted", False):      # set by the MSE layer when there is one
        f |= FLAG_ENCRYPTION
    if p.peer_is_seed():
        f |= FLAG_SEED
    return f


def _is_us(session: "Session", addr: Addr) -> bool:
    if addr[1] != session.port:
        return False
    ours = {"127.0.0.1", "::1"}
    ep = session.endpoint
    if ep is not None:
        ours.add(str(ep.local_address[0]))
        ours.update(str(a[0]) for a in ep.reported_addresses())
    return addr[0] in ours


def _connected(torrent: "Torrent", addr: Addr) -> "PeerConnection | None":
    for p in torrent.peers:
        try:
            if _norm(p.addr) == addr or announce_addr(p) == addr:
                return p
        except ValueError:
            continue
    return None


# ---- ut_pex ----------------------------------------------------------------------------


class PexExtension(Extension):
    name = PEX

    def handler(self, peer: Any) -> ExtensionHandler | None:
        if peer.torrent.private or not peer.torrent.session.pex:
            return None                 # BEP 27: peers only from the private tracker
        return PexHandler(peer)


class PexHandler(ExtensionHandler):
    name = PEX

    def __init__(self, peer: "PeerConnection") -> None:
        super().__init__()
        self.peer = peer
        self.sender = PexSender()
        self.receiver = PexReceiver()

    def get_timer(self) -> float | None:
        # checked at every tick of the connection (once a second) once the
        # peer speaks ut_pex; the sender itself keeps the once-a-minute rule
        return 0.0 if self.peer_supports else None

    def handle_timer(self, now: float) -> None:
        t = self.peer.torrent
        if t.private:
            return      # a magnet whose metadata said private after this handler began
        current: dict[Addr, int] = {}
        for p in t.peers:
            if p is self.peer:
                continue
            a = announce_addr(p)
            if a is not None:
                current[a] = _flags(p)
        payload = self.sender.build(now, current)
        if payload is not None:
            self.send_payload(payload)
            t.counters["pex.sent"] += 1

    def receive_untrusted(self, payload: bytes, now: float) -> None:
        t = self.peer.torrent
        try:
            msg = self.receiver.receive(payload, now)
        except PexError as exc:
            t.counters[f"pex.violation.{exc.reason}"] += 1
            raise
        t.counters["pex.received"] += 1
        if t.private:
            t.counters["pex.ignored_private"] += 1      # BEP 27, as above
            return
        for p in msg.added:
            addr = p.addr
            if addr in t.pex_learned or _is_us(t.session, addr) or _connected(t, addr):
                continue
            if len(t.pex_learned) >= 1000:
                break
            t.pex_learned[addr] = p.flags
            t.counters["pex.learned"] += 1
            t.add_peer(addr)


# ---- ut_holepunch ------------------------------------------------------------------------


class HolepunchExtension(Extension):
    name = HOLEPUNCH

    def handler(self, peer: Any) -> ExtensionHandler | None:
        return HolepunchHandler(peer)


class HolepunchHandler(ExtensionHandler):
    name = HOLEPUNCH

    def __init__(self, peer: "PeerConnection") -> None:
        super().__init__()
        self.peer = peer

    def send(self, kind: MsgType, addr: Addr, error: int = 0) -> None:
        self.send_payload(encode_holepunch(HolepunchMessage(kind, addr, error)))

    def receive_untrusted(self, payload: bytes, now: float) -> None:
        t = self.peer.torrent
        try:
            msg = parse_holepunch_untrusted(payload)
        except HolepunchError as exc:
            t.counters[f"holepunch.violation.{exc.reason}"] += 1
            raise
        if not self.peer_supports:
            # it did not name ut_holepunch in its handshake, so we could not
            # answer (libtorrent ignores these too)
            t.counters["holepunch.ignored_unannounced"] += 1
            return
        if msg.msg_type is MsgType.RENDEZVOUS:
            self._relay(msg.addr)
        elif msg.msg_type is MsgType.CONNECT:
            t.counters["holepunch.connect_received"] += 1
            start_punch(t, _norm(msg.addr))
        else:
            name = ERROR_NAMES.get(msg.error, str(msg.error))
            t.counters[f"holepunch.error_received.{name}"] += 1

    def _relay(self, target: Addr) -> None:
        t = self.peer.torrent
        seen = _norm(self.peer.addr)
        # where the target should punch to: for an incoming TCP peer that
        # told no listen port, the address we see (the best we know)
        me = announce_addr(self.peer) or seen
        target = _norm(target)
        other = _connected(t, target)
        if other is self.peer:
            other = None
        handler = other.extensions.get(HOLEPUNCH) if other is not None and \
            other.extensions is not None else None
        supports = isinstance(handler, HolepunchHandler) and handler.peer_supports
        # "self": the address it listens at, or the one we see it at
        requester = target if target == seen else me
        code = relay_error(target, requester, connected=other is not None, supports=supports)
        if code:
            t.counters[f"holepunch.relay_error.{ERROR_NAMES[code]}"] += 1
            self.send(MsgType.ERROR, target, code)
            return
        assert other is not None and isinstance(handler, HolepunchHandler)
        target_addr = announce_addr(other) or _norm(other.addr)
        self.send(MsgType.CONNECT, target_addr)
        handler.send(MsgType.CONNECT, me)
        other.flush_extensions()
        t.counters["holepunch.relayed"] += 1


def try_rendezvous(torrent: "Torrent", addr: tuple[Any, ...]) -> bool:
    """Dialing ``addr`` failed: ask a connected peer that listed it in its
    PEX and speaks ut_holepunch to introduce us.  True if one was asked."""
    try:
        a = _norm(addr)
    except ValueError:
        return False
    if a not in torrent.pex_learned or a in torrent.rendezvous_asked:
        return False
    for p in list(torrent.peers):
        pex = p.extensions.get(PEX) if p.extensions is not None else None
        hp = p.extensions.get(HOLEPUNCH) if p.extensions is not None else None
        if isinstance(pex, PexHandler) and isinstance(hp, HolepunchHandler) \
                and hp.peer_supports and a in pex.receiver.known:
            torrent.rendezvous_asked.add(a)
            hp.send(MsgType.RENDEZVOUS, a)
            p.flush_extensions()
            torrent.counters["holepunch.rendezvous_sent"] += 1
            return True
    return False


def start_punch(torrent: "Torrent", addr: Addr) -> None:
    """Punch to ``addr`` and connect, unless connected or already punching."""
    session = torrent.session
    if session.endpoint is None or not torrent.active or _connected(torrent, addr) \
            or addr in torrent.punching or len(torrent.punching) >= MAX_PUNCHES \
            or _is_us(session, addr):
        torrent.counters["holepunch.connect_ignored"] += 1
        return
    torrent.punching.add(addr)
    session.spawn(punch_and_connect, session, torrent, addr)


def _local_public(session: "Session", peer: Addr) -> tuple[Any, ...]:
    """Our public endpoint as the relay sees it, for the punch's
    tie-break: the external address the peers' ``yourip`` voted for (with
    our port: the NAT is assumed to keep it, as the usual ones do), else
    the bound address."""
    ep = session.endpoint
    v6 = ":" in peer[0]
    ext = ep.external_address
    if ext is not None and (":" in str(ext[0])) == v6:
        return (str(ext[0]), session.port)
    for a in ep.reported_addresses():
        if (":" in str(a[0])) == v6:
            return (str(a[0]), session.port)
    return tuple(ep.local_address[:2])


async def punch_and_connect(session: "Session", torrent: "Torrent", addr: Addr) -> None:
    """Both ends of a ``connect``: punch on the shared socket, then the
    peer's tasks on that connection, marked as punched.  The side whose SYN
    made the connection (utp.punch's tie-break) is the outgoing side of the
    BitTorrent (and MSE) handshake, the other answers as for an incoming
    connection, so the encryption policy holds as on any connection: the
    one attempt is plain unless the policy requires MSE (an attempt that
    fails cannot be retried on a punched connection)."""
    from utp import NATTraversalError, is_initiator

    from .encryption import EncryptionPolicy
    local = _local_public(session, addr)
    try:
        try:
            stream = await session.endpoint.punch(addr, local_public=local,
                                                  timeout=PUNCH_TIMEOUT, birthday=None)
        except (TimeoutError, OSError, ValueError, RuntimeError, NATTraversalError):
            session.counters["holepunch.punch_failed"] += 1
            return
        session.counters["holepunch.punched"] += 1
        if is_initiator(local, addr):
            encrypt = session.encryption == EncryptionPolicy.REQUIRED
            await session.run_outgoing(stream, torrent, addr, "utp", encrypt, punched=True)
        else:
            await session.run_incoming(stream, "utp", punched=True)
    finally:
        torrent.punching.discard(addr)


def install(session: "Session") -> None:
    """Offer ut_pex and ut_holepunch on the session's new connections."""
    session.extensions.register(PexExtension())
    session.extensions.register(HolepunchExtension())

