"""BitTorrent peer for utpkit: downloads and seeds over uTP and TCP with
peers from the torrent's trackers or given by address (DHT and the rest:
see below).

    async with bt.open_session(download_dir="dl") as session:
        torrent = await session.add_torrent("x.torrent")
        torrent.add_peer(("127.0.0.1", 6881))
        await torrent.wait_finished()

The sans-I/O parts (no trio at import, no sockets):

- :mod:`bt.metainfo`: torrents parsed from untrusted bytes (BEP 3, BEP 12
  tiers, BEP 47 pad files and attributes, BEP 52 hybrids through their v1
  side) into frozen dataclasses; the infohash over the raw info bytes;
  paths that cannot leave the download directory; one-line errors naming
  the field;
- :mod:`bt.create`: making torrents (libtorrent's piece size choice,
  hashing in a thread, optional pad files, tracker tiers, private flag);
- :mod:`bt.storage` / :mod:`bt.storage_file`: storage behind three levels
  (open a torrent, get a piece, read/write/verify/mark complete), a file
  backend (pread/pwrite, sparse, a resume file) and a memory backend,
  blocking calls with thin trio wrappers that run them in threads;
- :mod:`bt.wire`: the stateless peer-wire codec -- every BEP 3 message,
  ``port`` (BEP 5), the Fast Extension (BEP 6), the extension protocol and
  its handshake (BEP 10), the 68-byte handshake and its reserved bits, and
  BEP 6's allowed-fast set;
- :mod:`bt.peerwire`: :class:`PeerWire`, one connection's sans-I/O protocol
  core (h11's shape: ``receive_data(data, now)``, ``next_event()``,
  ``send(event)``, ``data_to_send()``, ``get_timer()``, ``handle_timer``),
  which disconnects a misbehaving peer with a counted :class:`Violation`;
- :mod:`bt.picker` (rarest-first piece picker, end game, sequential mode,
  request pipelining depth), :mod:`bt.choker` (tit-for-tat, optimistic
  unchoke, anti-snubbing), :mod:`bt.ratelimit` (token bucket): pure policy
  fed ``now``; :mod:`bt.swarmsim`, a seeded swarm on a virtual clock
  driving them;
- :mod:`bt.httptracker`: the HTTP(S) announce URL (BEP 3's byte-exact
  percent-encoding) and the answer parser (BEP 23 compact and dictionary
  peers, BEP 7 ``peers6``, ``failure reason``, ``warning message``,
  intervals, tracker id), plus its httpx client;
- :mod:`bt.mse`: :class:`MSEHandshake`, the message stream encryption
  handshake core for both roles (DH, RC4 from ``cryptography``, pads and
  sync windows bounded, plain handshakes told apart), failing with a
  counted :class:`MSEReason`;
- the ``bt create`` and ``bt info`` commands (``python -m bt``).

The trio drivers (loaded on first use, so ``import bt`` stays light):
:mod:`bt.peer` (one connection: reader, writer and server tasks around a
PeerWire core, over a uTP or TCP stream), :mod:`bt.torrent` (picker,
choker every 10 s, writes and verification, Have broadcasts, request
timeouts, pause/resume/force recheck, state transitions in one place)
and :mod:`bt.session` (:func:`open_session`: one uTP Endpoint and a TCP
listener on the same port, incoming connections matched by infohash,
outgoing uTP first then TCP, self and duplicate connections closed, IP
bans, remove_torrent, the global rate limits of :mod:`bt.limits`),
:mod:`bt.announce` (each torrent's trackers: BEP 12 tiers over HTTP(S) and
the session's UDP tracker client, started / completed / stopped,
intervals; ``torrent.status().trackers``), :mod:`bt.events` (aria2's
download events and gids: ``session.add_listener``, ``session.events()``),
:mod:`bt.hooks` (aria2's ``--on-download-*`` hook commands);
``bt download`` / ``bt seed``.

Not written yet: RPC, MSE and the
extensions (ut_metadata, ut_pex, ut_holepunch), DHT and magnets.  It is
not a client UI.
"""

from .create import CreateError, create_torrent, create_torrent_async, piece_size_for, write_torrent
from .metainfo import (FileEntry, Metainfo, MetainfoError, load_metainfo, parse_info_untrusted,
                       parse_metainfo_untrusted)
from .mse import CryptoMethod, MSEError, MSEHandshake, MSEReason
from .peerwire import ConnState, ConnectionClosed, PeerWire, RequestsDropped
from .storage import AsyncTorrentStorage, MemoryStorage, Piece, StorageError
from .storage_file import FileStorage
from .wire import Event, Geometry, Violation, WireError

__all__ = ["CreateError", "create_torrent", "create_torrent_async", "piece_size_for", "write_torrent",
           "FileEntry", "Metainfo", "MetainfoError", "load_metainfo", "parse_info_untrusted",
           "parse_metainfo_untrusted",
           "AsyncTorrentStorage", "MemoryStorage", "Piece", "StorageError", "FileStorage",
           "Event", "Geometry", "Violation", "WireError", "PeerWire", "ConnState",
           "ConnectionClosed", "RequestsDropped",
           "MSEHandshake", "MSEError", "MSEReason", "CryptoMethod", "EncryptionPolicy",
           "open_session", "Session", "SessionError", "SessionStatus", "Torrent", "TorrentStatus",
           "TorrentState", "TorrentError", "TrackerStatus", "TrackerState",
           "PeerTransfer", "EventKind", "DownloadEvent", "Notifier", "EventStream", "Hooks"]

# The trio drivers load on first use, so ``import bt`` (and ``bt info``)
# stays free of trio and the uTP extension.
_LAZY = {"EncryptionPolicy": "encryption",
         "open_session": "session", "Session": "session", "SessionError": "session",
         "SessionStatus": "session",
         "Torrent": "torrent", "TorrentStatus": "torrent", "TorrentState": "torrent",
         "TorrentError": "torrent", "TrackerStatus": "announce", "TrackerState": "announce",
         "PeerTransfer": "torrent", "EventKind": "events", "DownloadEvent": "events",
         "Notifier": "events", "EventStream": "events", "Hooks": "hooks"}


def __getattr__(name: str) -> object:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'bt' has no attribute {name!r}")
    import importlib
    return getattr(importlib.import_module(f".{mod}", __name__), name)
