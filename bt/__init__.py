"""BitTorrent peer for utpkit.  Being built: what exists so far are the
sans-I/O foundations -- metainfo (parsing, with safe paths; creating
torrents), storage behind three levels (files with a resume file, or
memory), and the ``bt create`` / ``bt info`` commands.  The peer wire, the
picker, the choker, the session and ``bt download`` / ``bt seed`` do not
exist yet.

It will speak the peer wire protocol (BEP 3) over TCP and uTP, with magnet
links (BEP 9/10), peer exchange (BEP 11), UDP and HTTP trackers (BEP 15/23)
and holepunch (BEP 55), as sans-I/O cores with trio drivers on top, and
report download events to callbacks, hook commands and aria2-style JSON-RPC
notifications.  It is not a full client UI.  Importing ``bt`` does not
import trio.
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
