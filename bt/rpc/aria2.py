"""aria2's RPC methods over a :class:`bt.session.Session`.

Downloads are kept by gid in one ordered table (the order is aria2's
queue order: ``changePosition`` moves entries, ``tellWaiting`` lists the
paused ones in it).  A download's status is derived from its torrent
(:mod:`bt.rpc.status`); a removed one keeps its last struct, shown by
``tellStopped`` until ``purgeDownloadResult`` / ``removeDownloadResult``
(at most ``max-download-result`` of them, aria2's 1000).

A magnet link has aria2's two steps: ``addUri`` returns the gid of a
*metadata download* (its file is ``[METADATA]name``); once the torrent's
metadata has arrived that one is ``complete`` with ``followedBy`` naming
the real download, whose gid is the torrent's own and whose
``following`` names the metadata step -- the shape aria2 clients (AriaNg,
aria2p) follow.

What has no meaning for a BitTorrent-only client (http/ftp URIs,
Metalink, ``changeUri``, ``getServers``) answers with an error saying so.
Speed limits as aria2's: ``max-overall-download-limit`` /
``max-overall-upload-limit`` are the session's global limits, and a
download's ``max-download-limit`` / ``max-upload-limit`` (given at add, by
``changeOption``, or as the global option that new downloads inherit)
are that torrent's own limits under them (:mod:`bt.limits`).
"""

from __future__ import annotations

import base64
import binascii
import logging
import os
import secrets
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from .jsonrpc import Method, Params, RpcError
from .status import aria2_status, files_struct, peers_struct, torrent_struct

if TYPE_CHECKING:
    from ..session import Session
    from ..torrent import Torrent

__all__ = ["Aria2Api", "Download", "NOTIFICATIONS", "MAX_DOWNLOAD_RESULT", "parse_rate_option"]

log = logging.getLogger("bt.rpc")

NOTIFICATIONS = ("aria2.onDownloadStart", "aria2.onDownloadPause", "aria2.onDownloadStop",
                 "aria2.onDownloadComplete", "aria2.onDownloadError", "aria2.onBtDownloadComplete")
#: Stopped downloads remembered for tellStopped (aria2's --max-download-result).
MAX_DOWNLOAD_RESULT = 1000
#: Downloads fetching data at once; the rest wait in the queue (aria2's
#: --max-concurrent-downloads, default 5).  Unlike aria2, a download that
#: has all its data and seeds holds no slot: aria2 keeps it until
#: --seed-ratio/--seed-time end the seeding, and utpkit seeds until removed.
MAX_CONCURRENT = 5
_VERSION = "1.36.0"
_RATE_OPTIONS = ("max-overall-download-limit", "max-overall-upload-limit",
                 "max-download-limit", "max-upload-limit")


def parse_rate_option(name: str, value: str) -> int:
    """aria2's speed syntax: bytes/s with an optional K or M (1024s); 0
    is unlimited.  RpcError with aria2's message otherwise."""
    v = value.strip()
    mult = 1
    if v[-1:].upper() in ("K", "M"):
        mult = 1024 if v[-1].upper() == "K" else 1024 * 1024
        v = v[:-1]
    if not v.isdigit():
        raise RpcError(f"We encountered a problem while processing the option '--{name}'.")
    return int(v) * mult


def _apply_rates(set_limits: Callable[..., None], rates: dict[str, int], download: str,
                 upload: str) -> None:
    """Call ``set_limits`` (a session's or a torrent's) with the rates named
    ``download`` / ``upload`` among ``rates`` (0: unlimited)."""
    kw = {name: rates[key] or None for name, key in (("download", download), ("upload", upload))
          if key in rates}
    if kw:
        set_limits(**kw)


def new_gid(taken: Any) -> str:
    """16 hex digits not in ``taken`` and not zero (aria2's gids are
    64-bit numbers, 0 being invalid)."""
    while True:
        gid = secrets.token_hex(8)
        if gid not in taken and int(gid, 16):
            return gid


def check_gid(text: str) -> str:
    """aria2 accepts a gid's unique prefix; we take the full 16 digits."""
    if len(text) != 16 or any(c not in "0123456789abcdefABCDEF" for c in text):
        raise RpcError(f"Invalid GID {text}")
    return text.lower()


@dataclass
class Download:
    """One gid's bookkeeping.  ``source``: the .torrent bytes or the
    magnet URI it came from (for saveSession).  ``final``: the frozen
    status struct once the download stopped (removed, complete, error)."""
    gid: str
    torrent: "Torrent"
    dir: str
    source: bytes | str
    options: dict[str, str] = field(default_factory=dict)
    metadata_step: bool = False
    followed_by: list[str] = field(default_factory=list)
    following: str | None = None
    final: dict[str, Any] | None = None
    #: When it stopped, for tellStopped's order (0: not stopped yet).
    stop_seq: int = 0
    #: Waiting in the queue for a slot (aria2's "waiting"): its torrent is
    #: paused until :meth:`Aria2Api.schedule` starts it.
    queued: bool = False

    @property
    def links(self) -> dict[str, Any]:
        return {"followedBy": list(self.followed_by), "following": self.following}

    def status(self) -> str:
        if self.final is not None:
            return str(self.final["status"])
        if self.queued:
            return "waiting"
        return aria2_status(self.torrent)

    def struct(self, keys: list[str] | None = None) -> dict[str, Any]:
        if self.final is not None:
            d = dict(self.final)
            d.update({k: v for k, v in self.links.items() if v})
            return {k: v for k, v in d.items() if k in keys} if keys else d
        name = None
        if self.metadata_step:
            name = "[METADATA]" + str(getattr(self.torrent, "name", "") or
                                      self.torrent.info_hash.hex())
        out = torrent_struct(self.torrent, self.gid, self.dir, metadata_name=name,
                             links=self.links, keys=keys)
        if self.queued and "status" in out:
            out["status"] = "waiting"
        return out

    def freeze(self, status: str) -> None:
        """Keep the struct as it is now, as a stopped download's."""
        d = self.struct()
        d.update(status=status, downloadSpeed="0", uploadSpeed="0", connections="0",
                 numSeeders="0")
        from .status import ERROR_REMOVED, ERROR_UNKNOWN
        if status == "removed":
            d.update(errorCode=ERROR_REMOVED, errorMessage="")
        elif status == "complete":
            d.update(errorCode="0", errorMessage="")
        elif status == "error":
            d.setdefault("errorCode", ERROR_UNKNOWN)
            d.setdefault("errorMessage", str(self.torrent.error or "unknown error"))
        self.final = d


Notify = Callable[[str, str], None]


class Aria2Api:
    """The methods, bound to a session.  ``options``: the global options
    (aria2 names, string values; ``dir`` is the default download
    directory).  ``save_session``: writes the session file (None: no
    ``--save-session``).  ``shutdown(force)``: ends the daemon."""

    def __init__(self, session: "Session", *, options: dict[str, str] | None = None,
                 save_session: Callable[[], Awaitable[None]] | None = None,
                 shutdown: Callable[[bool], None] | None = None) -> None:
        self.session = session
        self.options: dict[str, str] = {"dir": session.download_dir,
                                        "max-overall-download-limit": "0",
                                        "max-overall-upload-limit": "0",
                                        "max-download-result": str(MAX_DOWNLOAD_RESULT),
                                        "max-concurrent-downloads": str(MAX_CONCURRENT)}
        self.options.update(options or {})
        self.downloads: dict[str, Download] = {}
        self._save_session = save_session
        self._shutdown = shutdown
        self.session_id = secrets.token_hex(20)
        #: Called with (notification method, gid) for every event; the
        #: server sets it to its WebSocket broadcast.
        self.notify: Notify = lambda method, gid: None
        self.stopped_total = 0

    # ---- bookkeeping -------------------------------------------------------------------

    def by_torrent(self, torrent: "Torrent") -> Download | None:
        """The live download whose torrent this is (a magnet's metadata
        step until its metadata arrives, then the real one)."""
        for d in reversed(self.downloads.values()):
            if d.torrent is torrent and d.final is None:
                return d
        return None

    def sync(self) -> None:
        """Advance magnets whose metadata has arrived: the metadata step
        completes, the real download appears (``followedBy``)."""
        for d in list(self.downloads.values()):
            if d.metadata_step and d.final is None and getattr(d.torrent, "has_metadata", True):
                real_gid = str(getattr(d.torrent, "gid", "")) or new_gid(self.downloads)
                d.followed_by = [real_gid]
                d.freeze("complete")
                self._stopped(d)
                self.downloads[real_gid] = Download(real_gid, d.torrent, d.dir, d.source,
                                                    dict(d.options), following=d.gid)
                self.notify("aria2.onDownloadComplete", d.gid)
                # (the real download's onDownloadStart comes from the session's
                # notifier, when the torrent starts downloading)

    def _stopped(self, d: Download) -> None:
        self.stopped_total += 1
        d.stop_seq = self.stopped_total
        limit = int(self.options.get("max-download-result", MAX_DOWNLOAD_RESULT) or 0)
        stopped = [g for g, x in self.downloads.items() if x.final is not None]
        for g in stopped[:max(0, len(stopped) - limit)]:
            del self.downloads[g]

    def event_gid(self, torrent: "Torrent") -> str | None:
        """The gid a notification about ``torrent`` names."""
        self.sync()
        d = self.by_torrent(torrent)
        return d.gid if d is not None else getattr(torrent, "gid", None)

    def get(self, gid_text: Any) -> Download:
        self.sync()
        gid = check_gid(gid_text)
        d = self.downloads.get(gid)
        if d is None:
            raise RpcError(f"GID {gid} is not found")
        return d

    def live(self, gid_text: Any, what: str) -> Download:
        d = self.get(gid_text)
        if d.final is not None:
            raise RpcError(f"Active Download not found for GID#{d.gid}")
        return d

    # ---- adding ------------------------------------------------------------------------

    async def add(self, source: bytes | str, options: dict[str, str], *,
                  gid: str | None = None, position: int | None = None) -> Download:
        """Add a torrent (bytes) or a magnet link to the session; the
        download's gid is ``gid`` when given (a restored session) else new.
        RpcError naming the cause when the session refuses it."""
        from ..metainfo import MetainfoError, parse_metainfo_untrusted
        from ..session import SessionError
        from ..storage import StorageError
        directory = options.get("dir") or self.options["dir"]
        own = {k: parse_rate_option(k, options.get(k) or self.options.get(k) or "0")
               for k in ("max-download-limit", "max-upload-limit")}
        if gid is not None:
            gid = check_gid(gid)
            if gid in self.downloads:
                raise RpcError(f"GID {gid} is not unique.")
        magnet = isinstance(source, str)
        step_gid = gid if magnet else None
        paused = options.get("pause") == "true"
        queued = not paused and self.occupied() >= self.max_active()
        try:
            what: Any = source
            if not magnet:
                what = parse_metainfo_untrusted(source)       # type: ignore[arg-type]
                if what.info_hash in self.session.torrents:
                    raise RpcError(f"InfoHash {what.info_hash.hex()} is already registered.")
            torrent = await self.session.add_torrent(what, save_path=directory,
                                                     gid=None if magnet else gid,
                                                     paused=paused or queued)
        except (MetainfoError, SessionError, StorageError, ValueError, TypeError, OSError) as exc:
            if magnet and isinstance(exc, OSError):
                # a session without magnet support took the URI for a path
                raise RpcError("cannot add the magnet link: this bt session does not support "
                               "magnet links (no metadata exchange); add the .torrent with "
                               "aria2.addTorrent") from None
            what = "magnet link" if magnet else "torrent"
            raise RpcError(f"cannot add the {what}: {exc}") from None
        if magnet and getattr(torrent, "has_metadata", True):
            magnet = False           # metadata known at once (a saved torrent): one step
        g = (step_gid or new_gid(self._taken())) if magnet else str(torrent.gid)
        _apply_rates(torrent.set_limits, own, "max-download-limit", "max-upload-limit")
        d = Download(g, torrent, directory, source, dict(options), metadata_step=magnet,
                     queued=queued)
        self._insert(d, position)
        if magnet and not (paused or queued):
            # the notifier starts the torrent only once it has its metadata
            self.notify("aria2.onDownloadStart", d.gid)
        return d

    # ---- the queue -----------------------------------------------------------------------

    def max_active(self) -> int:
        return int(self.options.get("max-concurrent-downloads") or MAX_CONCURRENT)

    def occupied(self) -> int:
        """Downloads holding a slot: running and still fetching data."""
        return sum(1 for d in self.downloads.values()
                   if d.final is None and not d.queued and d.status() == "active"
                   and not getattr(d.torrent, "finished", False))

    async def schedule(self) -> None:
        """Start waiting downloads, in queue order, while slots are free
        (after a download finished, was paused or removed, or the limit
        rose)."""
        while self.occupied() < self.max_active():
            nxt = next((d for d in self.downloads.values() if d.final is None and d.queued), None)
            if nxt is None:
                return
            nxt.queued = False
            await nxt.torrent.resume()

    def _taken(self) -> set[str]:
        return set(self.downloads) | {t.gid for t in self.session.torrents.values()}

    def _insert(self, d: Download, position: int | None) -> None:
        items = list(self.downloads.items())
        where = len(items) if position is None else max(0, min(position, len(items)))
        items.insert(where, (d.gid, d))
        self.downloads = dict(items)

    async def _add_uri(self, p: Params) -> str:
        uris = p.strings(0)
        options = p.options(1)
        position = p.get(2, int, None)
        if not uris:
            raise RpcError("No URI to download.")
        magnets = [u for u in uris if u.startswith("magnet:")]
        if not magnets:
            raise RpcError(f"utpkit downloads BitTorrent only: {uris[0]!r} is not a magnet link "
                           "(HTTP, FTP and SFTP downloads are not supported; add the .torrent "
                           "with aria2.addTorrent)")
        d = await self.add(magnets[0], options, position=position)
        return d.gid

    async def _add_torrent(self, p: Params) -> str:
        data = p.get(0, str)
        p.strings(1, [])              # web seeds: accepted, not used
        options = p.options(2)
        position = p.get(3, int, None)
        try:
            raw = base64.b64decode(data, validate=True)
        except (binascii.Error, ValueError):
            raise RpcError("The parameter at 0 is not valid base64 torrent data.") from None
        d = await self.add(raw, options, position=position)
        return d.gid

    async def _unsupported(self, p: Params) -> Any:
        raise RpcError("utpkit downloads BitTorrent only: Metalink, changeUri and getServers "
                       "concern HTTP/FTP downloads, which it does not do")

    # ---- control -----------------------------------------------------------------------

    async def remove(self, d: Download) -> None:
        """Remove the download's torrent from the session (data kept) and
        keep its struct as ``removed``."""
        from ..session import SessionError
        if self.session.torrents.get(d.torrent.info_hash) is d.torrent:
            try:
                await self.session.remove_torrent(d.torrent)
            except SessionError as exc:
                raise RpcError(str(exc)) from None
        d.freeze("complete" if not d.metadata_step and d.torrent.finished else "removed")
        d.queued = False
        self._stopped(d)
        await self.schedule()

    async def _remove(self, p: Params) -> str:
        d = self.live(p.get(0, str), "remove")
        await self.remove(d)
        return d.gid

    async def _pause(self, p: Params) -> str:
        d = self.live(p.get(0, str), "pause")
        if d.status() not in ("active", "waiting"):
            raise RpcError(f"GID#{d.gid} cannot be paused now")
        await self._pause_one(d)
        await self.schedule()
        return d.gid

    async def _pause_one(self, d: Download) -> None:
        if d.queued:
            d.queued = False            # its torrent waited paused already
        else:
            await d.torrent.pause()

    async def _unpause(self, p: Params) -> str:
        d = self.live(p.get(0, str), "unpause")
        if d.status() != "paused":
            raise RpcError(f"GID#{d.gid} cannot be unpaused now")
        await self._unpause_one(d)
        return d.gid

    async def _unpause_one(self, d: Download) -> None:
        """Back to the queue (aria2: paused -> waiting); it starts at once
        when a slot is free."""
        d.queued = True
        await self.schedule()

    async def _pause_all(self, p: Params) -> str:
        for d in self._select(("active", "waiting")):
            if d.final is None:
                await self._pause_one(d)
        return "OK"

    async def _unpause_all(self, p: Params) -> str:
        for d in self._select(("paused",)):
            if d.final is None:
                d.queued = True
        await self.schedule()
        return "OK"

    async def _change_position(self, p: Params) -> int:
        d = self.live(p.get(0, str), "move")
        pos = p.get(1, int)
        how = p.get(2, str)
        waiting = [g for g, x in self.downloads.items()
                   if x.final is None and x.status() in ("waiting", "paused")]
        if d.gid not in waiting:
            raise RpcError(f"GID#{d.gid} not found in the waiting queue.")
        cur = waiting.index(d.gid)
        if how == "POS_SET":
            new = pos
        elif how == "POS_CUR":
            new = cur + pos
        elif how == "POS_END":
            new = len(waiting) - 1 + pos
        else:
            raise RpcError(f"Illegal argument: how must be POS_SET, POS_CUR or POS_END, not {how}")
        new = max(0, min(new, len(waiting) - 1))
        waiting.remove(d.gid)
        waiting.insert(new, d.gid)
        # the waiting ones take their new order in the slots they held
        old, wset, slots = self.downloads, set(waiting), iter(waiting)
        self.downloads = {g: old[g] for g in
                          (next(slots) if g in wset else g for g in old)}
        return new

    # ---- status ------------------------------------------------------------------------

    def _keys(self, p: Params, index: int) -> list[str] | None:
        keys = p.strings(index, None)
        return keys or None

    async def _tell_status(self, p: Params) -> dict[str, Any]:
        d = self.get(p.get(0, str))
        return d.struct(self._keys(p, 1))

    async def _get_files(self, p: Params) -> list[dict[str, Any]]:
        d = self.get(p.get(0, str))
        if d.final is not None:
            return list(d.final.get("files", []))
        name = "[METADATA]" if d.metadata_step else None
        return files_struct(d.torrent, d.dir, metadata_name=name)

    async def _get_peers(self, p: Params) -> list[dict[str, Any]]:
        d = self.get(p.get(0, str))
        return [] if d.final is not None else peers_struct(d.torrent)

    async def _get_uris(self, p: Params) -> list[Any]:
        self.get(p.get(0, str))
        return []

    def _select(self, statuses: tuple[str, ...]) -> list[Download]:
        self.sync()
        return [d for d in self.downloads.values() if d.status() in statuses]

    async def _tell_active(self, p: Params) -> list[dict[str, Any]]:
        keys = self._keys(p, 0)
        return [d.struct(keys) for d in self._select(("active",))]

    def _window(self, p: Params, items: list[Download]) -> list[dict[str, Any]]:
        """aria2's (offset, num): a negative offset counts from the end and
        walks backwards."""
        offset = p.get(0, int)
        num = p.get(1, int)
        keys = self._keys(p, 2)
        if num <= 0:
            return []
        if offset < 0:
            start = len(items) + offset
            picked = [items[i] for i in range(start, max(-1, start - num), -1) if 0 <= i < len(items)]
        else:
            picked = items[offset:offset + num]
        return [d.struct(keys) for d in picked]

    async def _tell_waiting(self, p: Params) -> list[dict[str, Any]]:
        return self._window(p, self._select(("waiting", "paused")))

    async def _tell_stopped(self, p: Params) -> list[dict[str, Any]]:
        stopped = self._select(("complete", "error", "removed"))
        for d in stopped:
            if not d.stop_seq:          # an error found now
                self.stopped_total += 1
                d.stop_seq = self.stopped_total
        return self._window(p, sorted(stopped, key=lambda d: d.stop_seq))

    async def _purge(self, p: Params) -> str:
        for d in self._select(("complete", "error", "removed")):
            if d.final is None:         # an error still in the session
                await self.remove(d)
            del self.downloads[d.gid]
        return "OK"

    async def _remove_result(self, p: Params) -> str:
        d = self.get(p.get(0, str))
        if d.status() not in ("complete", "error", "removed"):
            raise RpcError(f"Could not remove download result of GID#{d.gid}")
        if d.final is None:             # an error still in the session
            await self.remove(d)
        del self.downloads[d.gid]
        return "OK"

    # ---- options -----------------------------------------------------------------------

    async def _get_option(self, p: Params) -> dict[str, str]:
        d = self.get(p.get(0, str))
        out = {k: v for k, v in self.options.items() if not k.startswith("max-overall")}
        out.update(d.options)
        out["dir"] = d.dir
        return out

    async def _change_option(self, p: Params) -> str:
        d = self.live(p.get(0, str), "change")
        opts = p.options(1)
        own = {k: parse_rate_option(k, opts[k])
               for k in ("max-download-limit", "max-upload-limit") if k in opts}
        if "dir" in opts and d.dir != opts["dir"]:
            raise RpcError("Option dir cannot be changed for a download that has started")
        _apply_rates(d.torrent.set_limits, own, "max-download-limit", "max-upload-limit")
        d.options.update(opts)
        return "OK"

    async def _get_global_option(self, p: Params) -> dict[str, str]:
        return dict(self.options)

    async def _change_global_option(self, p: Params) -> str:
        opts = p.options(0)
        rates = {k: parse_rate_option(k, v) for k, v in opts.items() if k in _RATE_OPTIONS}
        if "max-concurrent-downloads" in opts:
            v = opts["max-concurrent-downloads"].strip()
            if not v.isdigit() or int(v) < 1:
                raise RpcError("We encountered a problem while processing the option "
                               "'--max-concurrent-downloads'.")
        _apply_rates(self.session.set_limits, rates, "max-overall-download-limit",
                     "max-overall-upload-limit")
        self.options.update(opts)
        await self.schedule()
        return "OK"

    async def _global_stat(self, p: Params) -> dict[str, str]:
        self.sync()
        st = [d.status() for d in self.downloads.values()]
        live = [d.torrent for d in self.downloads.values() if d.final is None]
        down = sum(int(t.status().download_rate) for t in live)
        up = sum(int(t.status().upload_rate) for t in live)
        return {"downloadSpeed": str(down), "uploadSpeed": str(up),
                "numActive": str(st.count("active")),
                "numWaiting": str(st.count("waiting") + st.count("paused")),
                "numStopped": str(sum(s in ("complete", "error", "removed") for s in st)),
                "numStoppedTotal": str(self.stopped_total)}

    # ---- daemon ------------------------------------------------------------------------

    async def _version(self, p: Params) -> dict[str, Any]:
        return {"version": _VERSION, "enabledFeatures": ["BitTorrent", "Message Digest"]}

    async def _session_info(self, p: Params) -> dict[str, str]:
        return {"sessionId": self.session_id}

    async def _shutdown_m(self, p: Params) -> str:
        if self._shutdown is not None:
            self._shutdown(False)
        return "OK"

    async def _force_shutdown(self, p: Params) -> str:
        if self._shutdown is not None:
            self._shutdown(True)
        return "OK"

    async def _save(self, p: Params) -> str:
        if self._save_session is None:
            raise RpcError("Filename is not given.")
        try:
            await self._save_session()
        except OSError as exc:
            raise RpcError(f"Failed to serialize session to '{exc.filename}': {exc.strerror}") from None
        return "OK"

    def methods(self) -> dict[str, Method]:
        """Method name -> implementation, in aria2's order."""
        return {
            "aria2.addUri": self._add_uri, "aria2.addTorrent": self._add_torrent,
            "aria2.getPeers": self._get_peers, "aria2.addMetalink": self._unsupported,
            "aria2.remove": self._remove, "aria2.pause": self._pause,
            "aria2.forcePause": self._pause, "aria2.pauseAll": self._pause_all,
            "aria2.forcePauseAll": self._pause_all, "aria2.unpause": self._unpause,
            "aria2.unpauseAll": self._unpause_all, "aria2.forceRemove": self._remove,
            "aria2.changePosition": self._change_position, "aria2.tellStatus": self._tell_status,
            "aria2.getUris": self._get_uris, "aria2.getFiles": self._get_files,
            "aria2.getServers": self._unsupported, "aria2.tellActive": self._tell_active,
            "aria2.tellWaiting": self._tell_waiting, "aria2.tellStopped": self._tell_stopped,
            "aria2.getOption": self._get_option, "aria2.changeUri": self._unsupported,
            "aria2.changeOption": self._change_option,
            "aria2.getGlobalOption": self._get_global_option,
            "aria2.changeGlobalOption": self._change_global_option,
            "aria2.purgeDownloadResult": self._purge,
            "aria2.removeDownloadResult": self._remove_result,
            "aria2.getVersion": self._version, "aria2.getSessionInfo": self._session_info,
            "aria2.shutdown": self._shutdown_m, "aria2.forceShutdown": self._force_shutdown,
            "aria2.getGlobalStat": self._global_stat, "aria2.saveSession": self._save,
        }
