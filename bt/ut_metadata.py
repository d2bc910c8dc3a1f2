"""ut_metadata (BEP 9): fetch a torrent's info dictionary from peers, and
serve ours.

Three parts, no I/O:

- the codec: a message is a bencoded dictionary (``msg_type`` 0 request,
  1 data, 2 reject; ``piece``; ``total_size`` on data) followed, for data,
  by the piece's bytes (16 KiB each, the last one shorter);
- :class:`MetadataFetcher`, one per torrent that lacks its metadata: which
  piece to ask which peer for, request timeouts, assembly, and the SHA-1
  check against the infohash;
- :class:`UtMetadataHandler`, the BEP 10 extension on one connection
  (:mod:`bt.extensions`): it serves pieces when the torrent has its
  metadata (rejects otherwise) and feeds the fetcher while it has not.

A hash mismatch discards everything assembled.  When one peer sent every
piece, that peer lied: it is reported (the torrent drops it) and never
asked again.  When several peers contributed, nobody can tell which one
lied: each gets a strike and the next attempt takes every piece from a
single peer (the one with the fewest strikes), which settles it.  A peer
whose ``metadata_size`` disagrees with the size being fetched is asked only
if that size turns out wrong.
"""

from __future__ import annotations

import enum
import hashlib
from dataclasses import dataclass, field
from typing import Any, Protocol

from _utpkit.bencode import BencodeError, decode_prefix_untrusted, encode
from _utpkit.errors import RemoteProtocolError

from .extensions import Extension, ExtensionHandler
from .wire import Event, ExtensionHandshake

__all__ = ["MetadataMessage", "MetadataError", "MsgType", "MetadataFetcher", "FetchOutcome",
           "UtMetadata", "UtMetadataHandler", "MetadataSource",
           "encode_metadata_message", "decode_metadata_message_untrusted",
           "METADATA_PIECE", "MAX_METADATA_SIZE", "REQUEST_TIMEOUT", "PER_PEER_REQUESTS",
           "REJECT_BACKOFF", "SERVE_REPEATS"]

#: BEP 9: the metadata travels in 16 KiB pieces.
METADATA_PIECE = 16384
#: The largest info dictionary we fetch: 8 MiB holds the piece hashes (20
#: bytes each) of a 100 GiB torrent in 256 KiB pieces; a peer announcing
#: more is not asked (a bound on what a liar can make us buffer, as
#: libtorrent's max_metadata_size is).
MAX_METADATA_SIZE = 8 * 1024 * 1024
#: A request unanswered this long is asked of another peer (and the slow
#: peer rests for as long): a 16 KiB answer takes well under a second on
#: any working connection.
REQUEST_TIMEOUT = 10.0
#: Pieces outstanding with one peer at a time: enough to fill a connection
#: (4 x 16 KiB) while several peers share the work.
PER_PEER_REQUESTS = 4
#: A peer that rejected a request (it lacks the metadata itself, or limits
#: requests) is asked again after this long.
REJECT_BACKOFF = 10.0
#: Times one connection may be served each piece of our metadata: a
#: re-fetch after a hash failure needs a second copy; more is a peer making
#: us queue data it never reads.
SERVE_REPEATS = 3
_MAX_DICT = 1024


class MetadataError(RemoteProtocolError):
    """A malformed ut_metadata message."""


class MsgType(enum.IntEnum):
    REQUEST = 0
    DATA = 1
    REJECT = 2


@dataclass(frozen=True, slots=True)
class MetadataMessage(Event):
    """One ut_metadata message.  ``total_size`` and ``data`` only on DATA."""
    msg_type: int
    piece: int
    total_size: int | None = None
    data: bytes = field(default=b"", repr=False)


def encode_metadata_message(msg: MetadataMessage) -> bytes:
    d: dict[bytes, Any] = {b"msg_type": int(msg.msg_type), b"piece": msg.piece}
    if msg.total_size is not None:
        d[b"total_size"] = msg.total_size
    return encode(d) + bytes(msg.data)


def decode_metadata_message_untrusted(payload: bytes) -> MetadataMessage:
    """One message from an extended message's payload; MetadataError for
    anything malformed.  Unknown ``msg_type`` values decode (BEP 9 says to
    ignore them; the handler does)."""
    try:
        d, end = decode_prefix_untrusted(bytes(payload[:_MAX_DICT]), max_depth=4,
                                         max_size=_MAX_DICT)
    except BencodeError as exc:
        raise MetadataError(f"ut_metadata: {exc}") from None
    if type(d) is not dict:
        raise MetadataError("ut_metadata: the message is not a dictionary")
    msg_type, piece, total = d.get(b"msg_type"), d.get(b"piece"), d.get(b"total_size")
    if type(msg_type) is not int or type(piece) is not int:
        raise MetadataError("ut_metadata: msg_type and piece must be integers")
    if not 0 <= piece < MAX_METADATA_SIZE // METADATA_PIECE + 1 or not 0 <= msg_type < 256:
        raise MetadataError(f"ut_metadata: piece {piece} / msg_type {msg_type} out of range")
    data = bytes(payload[end:])
    if msg_type == MsgType.DATA:
        if type(total) is not int or not 0 < total <= MAX_METADATA_SIZE:
            raise MetadataError(f"ut_metadata: data with total_size {total!r}")
        if len(data) > METADATA_PIECE:
            raise MetadataError(f"ut_metadata: a piece of {len(data)} bytes")
        return MetadataMessage(msg_type, piece, total, data)
    if data:
        raise MetadataError(f"ut_metadata: {len(data)} bytes after a msg_type {msg_type}")
    return MetadataMessage(msg_type, piece)


@dataclass(frozen=True, slots=True)
class FetchOutcome:
    """What a data piece completed: the verified info dictionary, or a hash
    mismatch with the peers proven to have lied (possibly none, when
    several contributed)."""
    info_bytes: bytes | None = None
    liars: tuple[Any, ...] = ()


class _Peer:
    __slots__ = ("size", "outstanding", "rest_until", "strikes")

    def __init__(self, size: int) -> None:
        self.size = size
        self.outstanding: dict[int, float] = {}       # piece -> deadline
        self.rest_until = 0.0
        self.strikes = 0


class MetadataFetcher:
    """Assemble one torrent's info dictionary from many peers (module
    docstring).  Peers are opaque keys.  Sans-I/O: every call takes ``now``."""

    def __init__(self, info_hash: bytes, *, max_size: int = MAX_METADATA_SIZE,
                 timeout: float = REQUEST_TIMEOUT, per_peer: int = PER_PEER_REQUESTS) -> None:
        self.info_hash = info_hash
        self.max_size = max_size
        self.timeout = timeout
        self.per_peer = per_peer
        self.size: int | None = None
        self.info_bytes: bytes | None = None
        self._peers: dict[Any, _Peer] = {}
        self._banned: set[Any] = set()
        self._pieces: dict[int, tuple[bytes, Any]] = {}     # piece -> (data, sender)
        self._single: Any = None          # after a mixed failure: the one source
        self._single_mode = False
        self.counters: dict[str, int] = {"pieces": 0, "rejects": 0, "timeouts": 0,
                                         "hash_failures": 0, "liars": 0}

    # ---- peers ---------------------------------------------------------------------------

    def add_peer(self, peer: Any, metadata_size: int | None) -> bool:
        """``peer`` speaks ut_metadata and announced ``metadata_size``.
        False when it cannot be used (no size, too large, or it lied
        before)."""
        if peer in self._banned or metadata_size is None \
                or not 0 < metadata_size <= self.max_size:
            return False
        self._peers[peer] = _Peer(metadata_size)
        if self.size is None:
            self.size = metadata_size
        return True

    def remove_peer(self, peer: Any) -> None:
        self._peers.pop(peer, None)
        if self._single is peer:
            self._single = None

    @property
    def num_pieces(self) -> int:
        return -(-self.size // METADATA_PIECE) if self.size else 0

    @property
    def progress(self) -> float:
        """Fraction of the metadata received (0 before a size is known)."""
        if self.info_bytes is not None:
            return 1.0
        n = self.num_pieces
        return len(self._pieces) / n if n else 0.0

    def peers(self) -> list[Any]:
        return list(self._peers)

    # ---- requests --------------------------------------------------------------------------

    def _usable(self, peer: Any, p: _Peer, now: float) -> bool:
        if p.size != self.size or now < p.rest_until:
            return False
        if self._single_mode:
            if self._single is None or self._single not in self._peers:
                cands = [(q.strikes, i) for i, (k, q) in enumerate(self._peers.items())
                         if q.size == self.size and now >= q.rest_until]
                if not cands:
                    return False
                self._single = list(self._peers)[min(cands)[1]]
            return peer is self._single
        return True

    def requests_for(self, peer: Any, now: float) -> list[int]:
        """Pieces to request from ``peer`` now (marked outstanding)."""
        p = self._peers.get(peer)
        if p is None or self.info_bytes is not None or self.size is None \
                or not self._usable(peer, p, now):
            return []
        busy = {i for q in self._peers.values() for i in q.outstanding}
        out = []
        for i in range(self.num_pieces):
            if len(p.outstanding) >= self.per_peer:
                break
            if i in self._pieces or i in busy:
                continue
            p.outstanding[i] = now + self.timeout
            out.append(i)
        return out

    def on_reject(self, peer: Any, piece: int, now: float) -> None:
        p = self._peers.get(peer)
        if p is not None and piece in p.outstanding:
            del p.outstanding[piece]
            p.rest_until = now + REJECT_BACKOFF
            self.counters["rejects"] += 1
            if self._single is peer:
                self._single = None

    def expire(self, now: float) -> None:
        """Free the requests past their deadline; their peers rest."""
        for peer, p in self._peers.items():
            late = [i for i, t in p.outstanding.items() if now >= t]
            for i in late:
                del p.outstanding[i]
                self.counters["timeouts"] += 1
            if late:
                p.rest_until = now + self.timeout
                if self._single is peer:
                    self._single = None

    def next_deadline(self) -> float | None:
        times = [t for p in self._peers.values() for t in p.outstanding.values()]
        return min(times) if times else None

    # ---- data ------------------------------------------------------------------------------

    def on_data(self, peer: Any, piece: int, total_size: int, data: bytes,
                now: float) -> FetchOutcome | None:
        """A data piece.  Unrequested ones and ones of the wrong size are
        dropped (a peer answering late after a timeout is not lying)."""
        p = self._peers.get(peer)
        if p is None or self.info_bytes is not None or piece not in p.outstanding:
            return None
        del p.outstanding[piece]
        if total_size != self.size:
            p.size = total_size                       # it changed its mind: not asked now
            return None
        want = min(METADATA_PIECE, self.size - piece * METADATA_PIECE)
        if len(data) != want:
            return None
        self._pieces[piece] = (data, peer)
        self.counters["pieces"] += 1
        if len(self._pieces) < self.num_pieces:
            return None
        return self._assemble()

    def _assemble(self) -> FetchOutcome:
        blob = b"".join(self._pieces[i][0] for i in range(self.num_pieces))
        senders = list(dict.fromkeys(s for _, s in self._pieces.values()))
        self._pieces.clear()
        if hashlib.sha1(blob).digest() == self.info_hash:
            self.info_bytes = blob
            return FetchOutcome(info_bytes=blob)
        self.counters["hash_failures"] += 1
        for q in self._peers.values():
            q.outstanding.clear()
        if len(senders) == 1:
            liar = senders[0]
            self._banned.add(liar)
            self.remove_peer(liar)
            self.counters["liars"] += 1
            # the size may have been the liar's: start again from the others'
            self.size = next(iter(q.size for q in self._peers.values()), None)
            self._single_mode = False
            return FetchOutcome(liars=(liar,))
        for s in senders:
            if s in self._peers:
                self._peers[s].strikes += 1
        self._single_mode = True
        self._single = None
        return FetchOutcome()

    def statistics(self) -> dict[str, Any]:
        return {"size": self.size, "have": len(self._pieces), "pieces": self.num_pieces,
                "peers": len(self._peers), "banned": len(self._banned), **self.counters}


# ---- the extension -------------------------------------------------------------------------

class MetadataSource(Protocol):
    """What the handler needs of its torrent."""

    @property
    def info_bytes(self) -> bytes | None: ...

    @property
    def metadata_fetcher(self) -> MetadataFetcher | None: ...

    def metadata_fetched(self, outcome: FetchOutcome) -> None: ...


class UtMetadataHandler(ExtensionHandler):
    """ut_metadata on one connection (module docstring)."""

    name = "ut_metadata"

    def __init__(self, source: MetadataSource) -> None:
        super().__init__()
        self.source = source
        #: The connection (set by :class:`UtMetadata`): what the torrent
        #: closes when this peer is proven to have sent a false dictionary.
        self.peer: Any = None
        self._served: dict[int, int] = {}
        self._check_at: float | None = None
        self.counters: dict[str, int] = {"served": 0, "rejected": 0, "ignored": 0}

    def handshake_fields(self) -> dict[bytes, Any]:
        info = self.source.info_bytes
        return {b"metadata_size": len(info)} if info is not None else {}

    def on_handshake(self, hs: ExtensionHandshake, now: float) -> None:
        f = self.source.metadata_fetcher
        if f is None:
            return
        if self.peer_supports and f.add_peer(self, hs.metadata_size):
            self._request(now)
        else:
            f.remove_peer(self)

    def _request(self, now: float) -> None:
        f = self.source.metadata_fetcher
        if f is None or not self.peer_supports:
            self._check_at = None
            return
        for piece in f.requests_for(self, now):
            self.send_payload(encode_metadata_message(MetadataMessage(MsgType.REQUEST, piece)))
        self._check_at = now + 1.0

    def receive_untrusted(self, payload: bytes, now: float) -> None:
        msg = decode_metadata_message_untrusted(payload)
        if msg.msg_type == MsgType.REQUEST:
            self._serve(msg.piece)
            return
        f = self.source.metadata_fetcher
        if f is None or msg.msg_type not in (MsgType.DATA, MsgType.REJECT):
            self.counters["ignored"] += 1     # late answers, unknown types (BEP 9: ignore)
            return
        if msg.msg_type == MsgType.REJECT:
            f.on_reject(self, msg.piece, now)
            return
        assert msg.total_size is not None
        outcome = f.on_data(self, msg.piece, msg.total_size, msg.data, now)
        if outcome is not None:
            self.source.metadata_fetched(outcome)
        if self.source.metadata_fetcher is not None:
            self._request(now)

    def _serve(self, piece: int) -> None:
        info = self.source.info_bytes
        n = -(-len(info) // METADATA_PIECE) if info is not None else 0
        if info is None or piece >= n or self._served.get(piece, 0) >= SERVE_REPEATS:
            self.counters["rejected"] += 1
            self.send_payload(encode_metadata_message(MetadataMessage(MsgType.REJECT, piece)))
            return
        self._served[piece] = self._served.get(piece, 0) + 1
        self.counters["served"] += 1
        chunk = info[piece * METADATA_PIECE:(piece + 1) * METADATA_PIECE]
        self.send_payload(encode_metadata_message(
            MetadataMessage(MsgType.DATA, piece, len(info), chunk)))

    def get_timer(self) -> float | None:
        return self._check_at if self.source.metadata_fetcher is not None else None

    def handle_timer(self, now: float) -> None:
        f = self.source.metadata_fetcher
        if f is not None:
            f.expire(now)
        self._request(now)

    def close(self) -> None:
        f = self.source.metadata_fetcher
        if f is not None:
            f.remove_peer(self)


class UtMetadata(Extension):
    """The ut_metadata extension for a session's registry: each connection's
    handler works for the connection's torrent (``peer.torrent``)."""

    name = "ut_metadata"

    def handler(self, peer: Any) -> UtMetadataHandler | None:
        source = getattr(peer, "torrent", None)
        if source is None:
            return None
        h = UtMetadataHandler(source)
        h.peer = peer
        return h
