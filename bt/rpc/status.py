"""aria2's status structs from a torrent: ``tellStatus``, ``getFiles``,
``getPeers``, every number a string and every field named as aria2
documents it (https://aria2.github.io/manual/en/html/aria2c.html#aria2.tellStatus).

Pure functions of a torrent's state (no trio, no I/O): the RPC layer
(:mod:`bt.rpc.aria2`) calls them on live torrents and keeps their result
as the frozen answer of a stopped download.
"""

from __future__ import annotations

import os
import urllib.parse
from typing import TYPE_CHECKING, Any, Iterable

if TYPE_CHECKING:
    from ..metainfo import Metainfo
    from ..torrent import Torrent

__all__ = ["ARIA2_STATUS", "aria2_status", "files_struct", "peers_struct", "torrent_struct",
           "bitfield_hex", "ERROR_REMOVED", "ERROR_UNKNOWN"]

#: Our torrent states as aria2's download statuses (a torrent that is
#: checking its data, fetching its metadata, downloading or seeding is
#: "active", as in aria2).
ARIA2_STATUS = {"checking": "active", "metadata": "active", "downloading": "active",
                "seeding": "active", "paused": "paused", "error": "error",
                "removed": "removed"}
#: aria2's errorCode for a download removed by the user, and for any
#: other failure ("unknown error").
ERROR_REMOVED = "31"
ERROR_UNKNOWN = "1"


def _b(flag: bool) -> str:
    return "true" if flag else "false"


def bitfield_hex(num_pieces: int, has: Any) -> str:
    """aria2's ``bitfield``: piece 0 is the high bit of the first byte,
    spare bits zero, as hex."""
    out = bytearray((num_pieces + 7) // 8)
    for i in range(num_pieces):
        if has(i):
            out[i >> 3] |= 0x80 >> (i & 7)
    return out.hex()


def aria2_status(torrent: "Torrent") -> str:
    return ARIA2_STATUS.get(str(torrent.state), "active")


def _has_metadata(torrent: "Torrent") -> bool:
    return bool(getattr(torrent, "has_metadata", True))


def files_struct(torrent: "Torrent", directory: str, *, metadata_name: str | None = None) -> list[dict[str, Any]]:
    """``getFiles``: one entry per file of the torrent (BEP 47 pad files
    left out; ``index`` counts from 1 in the torrent's order, pads
    included, so an index names the same file as in aria2)."""
    if metadata_name is not None or not _has_metadata(torrent):
        name = metadata_name if metadata_name is not None else "[METADATA]"
        return [{"index": "1", "path": name, "length": "0", "completedLength": "0",
                 "selected": "true", "uris": []}]
    meta = torrent.meta
    pl = meta.piece_length
    has = torrent.picker.has_piece
    out = []
    for n, f in enumerate(meta.files, start=1):
        if f.pad:
            continue
        done = 0
        if f.length:
            first, last = f.offset // pl, (f.offset + f.length - 1) // pl
            for i in range(first, last + 1):
                if has(i):
                    done += min(f.offset + f.length, (i + 1) * pl) - max(f.offset, i * pl)
        out.append({"index": str(n), "path": os.path.join(directory, *f.path),
                    "length": str(f.length), "completedLength": str(done),
                    "selected": "true", "uris": []})
    return out


def _percent(peer_id: bytes) -> str:
    return urllib.parse.quote_from_bytes(peer_id, safe="")


def peers_struct(torrent: "Torrent") -> list[dict[str, Any]]:
    """``getPeers``: the connected peers."""
    out = []
    n = torrent.geometry.num_pieces if _has_metadata(torrent) else 0
    for p in list(torrent.peers):
        seeder = bool(p.peer_is_seed()) if n else False
        out.append({
            "peerId": _percent(p.peer_id), "ip": str(p.addr[0]), "port": str(p.addr[1]),
            "bitfield": bitfield_hex(n, lambda i, p=p: torrent.picker.peer_has(p, i)),
            "amChoking": _b(p.core.am_choking), "peerChoking": _b(p.core.peer_choking),
            "downloadSpeed": str(int(p.down_rate)), "uploadSpeed": str(int(p.up_rate)),
            "seeder": _b(seeder)})
    return out


def _bittorrent(meta: "Metainfo | None", name: str | None) -> dict[str, Any]:
    if meta is None:
        return {"announceList": []}
    bt: dict[str, Any] = {"announceList": [list(t) for t in meta.trackers],
                          "mode": "multi" if meta.multi_file else "single",
                          "info": {"name": name if name is not None else meta.name}}
    if meta.comment:
        bt["comment"] = meta.comment
    if meta.creation_date is not None:
        bt["creationDate"] = meta.creation_date
    return bt


def _completed(torrent: "Torrent") -> int:
    """Bytes of verified pieces, in O(1): every piece is piece_length long
    but the last."""
    g = torrent.geometry
    have = torrent.picker.num_have
    if not have:
        return 0
    last = g.num_pieces - 1
    if torrent.picker.has_piece(last):
        return (have - 1) * torrent.meta.piece_length + g.piece_size(last)
    return have * torrent.meta.piece_length


def _rates(torrent: "Torrent") -> tuple[float, float]:
    """The torrent's download and upload rates as its once-a-second tick
    last computed them (what status() reports), without building a whole
    TorrentStatus (peer transfers, counters, trackers) per download: a
    tellActive of 1,000 downloads asks for 1,000 of these."""
    return float(torrent._down_rate), float(torrent._up_rate)    # (same package: bt)


def torrent_struct(torrent: "Torrent", gid: str, directory: str, *,
                   metadata_name: str | None = None,
                   links: dict[str, Any] | None = None,
                   status: str | None = None, error: str | None = None,
                   keys: Iterable[str] | None = None) -> dict[str, Any]:
    """``tellStatus``: the whole struct, or only ``keys`` (only those are
    computed).  ``status`` overrides the torrent's own (a metadata step
    that has finished is "complete"); ``links`` adds ``followedBy`` /
    ``following`` / ``belongsTo``; ``metadata_name`` describes a magnet's
    metadata step."""
    want = set(keys) if keys is not None else set()

    def need(key: str) -> bool:
        return not want or key in want
    with_meta = _has_metadata(torrent) and metadata_name is None
    state = status if status is not None else ARIA2_STATUS.get(str(torrent.state), "active")
    meta = torrent.meta if with_meta else None
    d: dict[str, Any] = {"gid": gid, "status": state}
    if need("totalLength"):
        d["totalLength"] = str(meta.total_length if meta else 0)
    if need("completedLength"):
        d["completedLength"] = str(_completed(torrent) if meta else 0)
    if need("uploadLength"):
        d["uploadLength"] = str(torrent.up.total)
    if need("downloadSpeed") or need("uploadSpeed"):
        down, up = _rates(torrent)
        d["downloadSpeed"], d["uploadSpeed"] = str(int(down)), str(int(up))
    d["infoHash"] = torrent.info_hash.hex()
    if need("numSeeders"):
        d["numSeeders"] = str(sum(1 for p in list(torrent.peers) if meta and p.peer_is_seed()))
    d["seeder"] = _b(bool(meta) and torrent.picker.num_have == torrent.geometry.num_pieces)
    d["pieceLength"] = str(meta.piece_length if meta else 16384)
    d["numPieces"] = str(meta.num_pieces if meta else 0)
    d["connections"] = str(len(torrent.peers))
    d["dir"] = directory
    if need("files"):
        d["files"] = files_struct(torrent, directory, metadata_name=metadata_name)
    if need("bittorrent"):
        d["bittorrent"] = _bittorrent(meta, None)
    if need("bitfield") and meta:
        d["bitfield"] = bitfield_hex(meta.num_pieces, torrent.picker.has_piece)
    if str(torrent.state) == "checking" and (need("verifiedLength") or need("verifyIntegrityPending")):
        st = torrent.status()
        if st.checking_progress is not None:
            d["verifiedLength"] = str(int(st.checking_progress * st.bytes_total))
            d["verifyIntegrityPending"] = "false"
    err = error if error is not None else torrent.error
    if state == "error":
        d["errorCode"], d["errorMessage"] = ERROR_UNKNOWN, err or "unknown error"
    elif state == "removed":
        d["errorCode"], d["errorMessage"] = ERROR_REMOVED, ""
    elif state == "complete":
        d["errorCode"], d["errorMessage"] = "0", ""
    if links:
        d.update({k: v for k, v in links.items() if v})
    if want:
        d = {k: v for k, v in d.items() if k in want}
    return d
