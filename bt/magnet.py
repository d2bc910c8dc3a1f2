"""Magnet links (BEP 9): a torrent named by its infohash alone.

    m = parse_magnet("magnet:?xt=urn:btih:...&dn=name&tr=udp://...&x.pe=1.2.3.4:6881")
    m.info_hash, m.name, m.trackers, m.peers
    str(m)                         # the canonical link again
    magnet_from_metainfo(meta)     # a .torrent's link (``bt magnet X.torrent``)

What a link gives is enough to find peers (trackers ``tr``, direct peers
``x.pe``, or the DHT with the infohash); the info dictionary itself comes
from those peers with ut_metadata (:mod:`bt.ut_metadata`).

Accepted: ``xt=urn:btih:`` with 40 hex digits or 32 base32 letters (BEP 9
allows both; base32 is what old clients wrote), ``dn``, ``tr`` (repeatable;
``tr.1``, ``tr.2``... as some clients number them), ``x.pe`` (``HOST:PORT``
with a literal IP, IPv6 in brackets; repeatable).  Other parameters (``xl``,
``ws``, ``so``, ``urn:btmh`` topics) are ignored, as libtorrent does with
what it does not use.  Errors are :class:`MagnetError` (a ValueError) with
one line naming the parameter at fault.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, quote

from _utpkit.addr import parse_hostport

__all__ = ["Magnet", "MagnetError", "parse_magnet", "magnet_from_metainfo", "MAX_MAGNET_LEN",
           "MAX_MAGNET_ITEMS"]

#: A link longer than this is refused: real ones are a few hundred bytes
#: (a hash, a name and some trackers); the bound keeps a hostile link from
#: costing more than a glance.
MAX_MAGNET_LEN = 64 * 1024
#: Trackers and peers kept from one link, each.
MAX_MAGNET_ITEMS = 200


class MagnetError(ValueError):
    """A magnet link that cannot be used; the message names the part."""


def _format_peer(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass(frozen=True, slots=True)
class Magnet:
    """A parsed magnet link: the v1 infohash, the display name (``dn``),
    the trackers (``tr``, in order, no duplicates) and the peers
    (``x.pe``)."""
    info_hash: bytes
    name: str | None = None
    trackers: tuple[str, ...] = ()
    peers: tuple[tuple[str, int], ...] = ()

    def __post_init__(self) -> None:
        if type(self.info_hash) is not bytes or len(self.info_hash) != 20:
            raise MagnetError(f"info_hash must be 20 bytes, not {self.info_hash!r}")

    def __str__(self) -> str:
        return self.format()

    def format(self) -> str:
        """The link: ``xt`` in lowercase hex first (what every client
        reads), then ``dn``, each ``tr`` and each ``x.pe``, percent-encoded."""
        parts = [f"xt=urn:btih:{self.info_hash.hex()}"]
        if self.name:
            parts.append("dn=" + quote(self.name, safe=""))
        parts += ["tr=" + quote(t, safe="") for t in self.trackers]
        parts += ["x.pe=" + quote(_format_peer(*p), safe="[]:") for p in self.peers]
        return "magnet:?" + "&".join(parts)


def _parse_btih(value: str) -> bytes:
    h = value[len("urn:btih:"):]
    if len(h) == 40:
        try:
            return bytes.fromhex(h)
        except ValueError:
            raise MagnetError(f"xt: {h!r} is not 40 hex digits") from None
    if len(h) == 32:
        try:
            return base64.b32decode(h.upper())
        except (binascii.Error, ValueError):
            raise MagnetError(f"xt: {h!r} is not 32 base32 letters") from None
    raise MagnetError(f"xt: the infohash must be 40 hex digits or 32 base32 letters, "
                      f"not {len(h)} characters")


def parse_magnet(link: str) -> Magnet:
    """Parse a ``magnet:?`` link (module docstring); MagnetError says what
    is wrong."""
    if not isinstance(link, str):
        raise MagnetError(f"a magnet link is text, not {type(link).__name__}")
    if len(link) > MAX_MAGNET_LEN:
        raise MagnetError(f"magnet link of {len(link)} characters (at most {MAX_MAGNET_LEN})")
    if not link[:8].lower() == "magnet:?":
        raise MagnetError("not a magnet link: it must start with 'magnet:?'")
    try:
        params = parse_qsl(link[8:], keep_blank_values=True, strict_parsing=False,
                           errors="strict", max_num_fields=4 * MAX_MAGNET_ITEMS + 16)
    except UnicodeDecodeError:
        raise MagnetError("magnet link: a parameter is not UTF-8 after percent-decoding") \
            from None
    except ValueError:
        raise MagnetError(f"magnet link: more than {4 * MAX_MAGNET_ITEMS + 16} parameters") \
            from None
    info_hash: bytes | None = None
    name: str | None = None
    trackers: dict[str, None] = {}
    peers: dict[tuple[str, int], None] = {}
    for key, value in params:
        k = key.lower()
        if k == "xt" or k.startswith("xt."):
            if value.lower().startswith("urn:btih:"):
                ih = _parse_btih(value)
                if info_hash is not None and ih != info_hash:
                    raise MagnetError("xt: two different BitTorrent infohashes")
                info_hash = ih
        elif k == "dn":
            name = value or None
        elif k == "tr" or (k.startswith("tr.") and k[3:].isdigit()):
            if not value:
                raise MagnetError("tr: empty tracker URL")
            if "://" not in value:
                raise MagnetError(f"tr: {value!r} is not a URL")
            if len(trackers) < MAX_MAGNET_ITEMS:
                trackers[value] = None
        elif k == "x.pe":
            try:
                host, port = parse_hostport(value)
            except ValueError as exc:
                raise MagnetError(f"x.pe: {exc}") from None
            if port == 0:
                raise MagnetError(f"x.pe: port 0 in {value!r}")
            if len(peers) < MAX_MAGNET_ITEMS:
                peers[(host, port)] = None
    if info_hash is None:
        raise MagnetError("magnet link without xt=urn:btih:<infohash>")
    return Magnet(info_hash, name, tuple(trackers), tuple(peers))


def magnet_from_metainfo(meta: Any, *, peers: tuple[tuple[str, int], ...] = ()) -> Magnet:
    """The magnet link of a parsed torrent (:class:`bt.metainfo.Metainfo`):
    its v1 infohash, name and trackers (every tier, in order)."""
    trackers = [u for tier in meta.trackers for u in tier]
    return Magnet(meta.info_hash, meta.name, tuple(dict.fromkeys(trackers)), tuple(peers))
