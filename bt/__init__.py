"""BitTorrent peer for utpkit -- under construction: the building blocks
exist, the peer that uses them does not yet.

What exists (no trio at import, no sockets):

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
- the ``bt create`` and ``bt info`` commands (``python -m bt``).

Not written yet: the peer wire, the picker and the choker (another branch
is building them), the trio drivers (session, torrent, peer connections
over TCP and uTP), trackers for torrents, ``bt download`` / ``bt seed``,
events and RPC, MSE and the extensions (ut_metadata, ut_pex,
ut_holepunch).  It is not a client UI.
"""

from .create import CreateError, create_torrent, create_torrent_async, piece_size_for, write_torrent
from .metainfo import (FileEntry, Metainfo, MetainfoError, load_metainfo, parse_info_untrusted,
                       parse_metainfo_untrusted)
from .storage import AsyncTorrentStorage, MemoryStorage, Piece, StorageError
from .storage_file import FileStorage

__all__ = ["CreateError", "create_torrent", "create_torrent_async", "piece_size_for", "write_torrent",
           "FileEntry", "Metainfo", "MetainfoError", "load_metainfo", "parse_info_untrusted",
           "parse_metainfo_untrusted",
           "AsyncTorrentStorage", "MemoryStorage", "Piece", "StorageError", "FileStorage"]
