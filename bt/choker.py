"""The choker: whom we upload to (pure policy, fed ``now`` and rates).

BitTorrent's tit-for-tat as the reference client and libtorrent do it:

- every 10 s (a rechoke) the ``slots`` (4) interested peers with the best
  rate get a regular upload slot: while leeching, the rate at which *they*
  send to us (reciprocation); while seeding, the rate at which we manage to
  send to them (fastest upload: the bandwidth goes where it is used);
- one more slot, the optimistic unchoke, goes to a random interested peer
  outside those and moves every 30 s (every third rechoke), so new peers
  get a first piece to trade and we discover better partners; a peer that
  connected recently is three times as likely to get it;
- anti-snubbing: a peer that sent us nothing for 60 s while we were
  interested is *snubbed* -- it loses its regular slot (it is not
  reciprocating) and can only come back through the optimistic slot.

Peers are opaque hashable keys.  Rates come from the caller (bytes/s,
measured however it likes).  Nothing reads a clock.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Hashable

from _utpkit.errors import LocalProtocolError

__all__ = ["Choker", "ChokeDecision", "UPLOAD_SLOTS", "RECHOKE_INTERVAL",
           "OPTIMISTIC_INTERVAL", "SNUB_TIMEOUT", "NEW_PEER_AGE"]

Peer = Hashable

UPLOAD_SLOTS = 4
RECHOKE_INTERVAL = 10.0
OPTIMISTIC_INTERVAL = 30.0
SNUB_TIMEOUT = 60.0
#: A peer counts as new (3x the optimistic weight) this long after it
#: connected: two optimistic periods, so it gets at least two draws.
NEW_PEER_AGE = 60.0


@dataclass(slots=True)
class _PeerState:
    connected_at: float
    last_data: float
    download_rate: float = 0.0      # from the peer to us
    upload_rate: float = 0.0        # from us to the peer
    peer_interested: bool = False   # the peer wants our data
    am_interested: bool = False     # we want its data


@dataclass(frozen=True, slots=True)
class ChokeDecision:
    """The outcome of a rechoke: who is unchoked now, and what changed."""
    unchoked: frozenset
    optimistic: Peer | None
    to_unchoke: frozenset = field(default_factory=frozenset)
    to_choke: frozenset = field(default_factory=frozenset)


class Choker:
    """See the module docstring.  Call :meth:`handle_timer` when
    :meth:`get_timer` says; it returns the decision to apply."""

    def __init__(self, rng: random.Random, *, slots: int = UPLOAD_SLOTS,
                 rechoke_interval: float = RECHOKE_INTERVAL,
                 optimistic_interval: float = OPTIMISTIC_INTERVAL,
                 snub_timeout: float = SNUB_TIMEOUT, now: float = 0.0) -> None:
        if slots < 0:
            raise LocalProtocolError("slots must be >= 0")
        self._rng = rng
        self.slots = slots
        self.rechoke_interval = rechoke_interval
        self.optimistic_interval = optimistic_interval
        self.snub_timeout = snub_timeout
        self._peers: dict[Peer, _PeerState] = {}
        self._unchoked: frozenset = frozenset()
        self.optimistic: Peer | None = None
        self._optimistic_since = -float("inf")
        self._next_rechoke = now
        self.optimistic_history: list[tuple[float, Peer]] = []

    # ---- feeding ----------------------------------------------------------------------

    def add_peer(self, peer: Peer, now: float) -> None:
        if peer in self._peers:
            raise LocalProtocolError(f"peer {peer!r} added twice")
        self._peers[peer] = _PeerState(connected_at=now, last_data=now)

    def remove_peer(self, peer: Peer) -> None:
        self._peers.pop(peer, None)
        self._unchoked = self._unchoked - {peer}
        if self.optimistic == peer:
            self.optimistic = None

    def update(self, peer: Peer, *, download_rate: float | None = None,
               upload_rate: float | None = None, peer_interested: bool | None = None,
               am_interested: bool | None = None, now: float | None = None) -> None:
        """New measurements or interest flags for ``peer``.  Becoming
        interested restarts the snub clock (``now`` required then)."""
        st = self._peers[peer]
        if download_rate is not None:
            st.download_rate = download_rate
        if upload_rate is not None:
            st.upload_rate = upload_rate
        if peer_interested is not None:
            st.peer_interested = peer_interested
        if am_interested is not None:
            if am_interested and not st.am_interested:
                if now is None:
                    raise LocalProtocolError("becoming interested needs now (the snub clock)")
                st.last_data = max(st.last_data, now)
            st.am_interested = am_interested

    def data_received(self, peer: Peer, now: float) -> None:
        """The peer sent us a block: it is not snubbing us."""
        self._peers[peer].last_data = now

    def is_snubbed(self, peer: Peer, now: float) -> bool:
        st = self._peers[peer]
        return st.am_interested and now - st.last_data >= self.snub_timeout

    @property
    def unchoked(self) -> frozenset:
        return self._unchoked

    # ---- timer ------------------------------------------------------------------------

    def get_timer(self) -> float:
        return self._next_rechoke

    def handle_timer(self, now: float, *, seeding: bool) -> ChokeDecision | None:
        if now < self._next_rechoke:
            return None
        return self.rechoke(now, seeding=seeding)

    def rechoke(self, now: float, *, seeding: bool) -> ChokeDecision:
        """Recompute the unchoked set now (also between timer ticks, e.g.
        when an unchoked peer leaves)."""
        self._next_rechoke = now + self.rechoke_interval
        peers = self._peers
        interested = [p for p, st in peers.items() if st.peer_interested]
        # Random order first, so the stable sort breaks rate ties fairly.
        self._rng.shuffle(interested)
        if seeding:
            ranked = sorted(interested, key=lambda p: -peers[p].upload_rate)
        else:
            ranked = sorted((p for p in interested if not self.is_snubbed(p, now)),
                            key=lambda p: -peers[p].download_rate)
        regular = set(ranked[:self.slots])
        opt = self.optimistic
        due = now - self._optimistic_since >= self.optimistic_interval
        if opt is None or due or opt in regular or not peers.get(opt, _NOBODY).peer_interested:
            opt = self._draw_optimistic([p for p in interested if p not in regular], now)
            if opt != self.optimistic or due:
                self._optimistic_since = now
            if opt is not None and opt != self.optimistic:
                self.optimistic_history.append((now, opt))
            self.optimistic = opt
        unchoked = frozenset(regular | ({opt} if opt is not None else set()))
        before = self._unchoked
        self._unchoked = unchoked
        return ChokeDecision(unchoked, opt, unchoked - before, before - unchoked)

    def _draw_optimistic(self, candidates: list, now: float) -> Peer | None:
        if not candidates:
            return None
        # Prefer someone other than the current one when there is a choice.
        if len(candidates) > 1 and self.optimistic in candidates:
            candidates = [p for p in candidates if p != self.optimistic]
        weights = [3.0 if now - self._peers[p].connected_at < NEW_PEER_AGE else 1.0
                   for p in candidates]
        return self._rng.choices(candidates, weights)[0]


_NOBODY = _PeerState(connected_at=0.0, last_data=0.0)
