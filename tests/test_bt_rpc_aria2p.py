"""A real aria2 client library, aria2p (PyPI), drives `bt daemon` end to end
(the daemon a subprocess, as a user runs it): adds a torrent, lists,
pauses, resumes, reads files and peers, receives the notifications over
aria2p's WebSocket listener, and the download completes from a libtorrent
seed on loopback (sha256 checked); then removes it.  A magnet link goes
through aria2's two steps (metadata download followedBy the real one) when
this build's session has magnet support."""

from __future__ import annotations

import hashlib
import time

import pytest

import bt

from bt.bench import libtorrent_settings
from testsupport import BtDaemon, bt_content, require_libtorrent, unavailable, wait_until

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SECRET = "aria2p-secret"
SIZE = 6 * 1024 * 1024
PIECE = 64 * 1024


def _until(what: str, cond, timeout: float = 60.0, daemon: BtDaemon | None = None):
    return wait_until(what, cond, timeout, log=daemon.lines if daemon else None)


class _Seed:
    """A libtorrent seed of ``data`` (uTP and TCP) in this process."""

    def __init__(self, lt, data: bytes, where) -> None:
        self.lt = lt
        self.ses = lt.session(libtorrent_settings("127.0.0.1", "both"))
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(lt.bdecode(data))
        atp.save_path = str(where)
        self.handle = self.ses.add_torrent(atp)
        _until("the libtorrent seed", lambda: self.handle.status().state == lt.torrent_status.seeding, 30)

    def connect(self, port: int) -> None:
        self.handle.connect_peer(("127.0.0.1", port))


def _events(api):
    """Start aria2p's WebSocket listener in a thread; returns the list it
    fills with (event, gid)."""
    got: list[tuple[str, str]] = []

    def on(name):
        return lambda api_, gid: got.append((name, gid))
    api.listen_to_notifications(threaded=True, handle_signals=False, timeout=1,
                                on_download_start=on("start"), on_download_pause=on("pause"),
                                on_download_stop=on("stop"), on_download_complete=on("complete"),
                                on_download_error=on("error"),
                                on_bt_download_complete=on("bt-complete"))
    return got


def test_aria2p_drives_the_daemon(tmp_path):
    lt = require_libtorrent()
    import aria2p
    src, names, data = bt_content(tmp_path, (SIZE, 100_000), name="payload", piece_length=PIECE)
    torrent_file = tmp_path / "payload.torrent"
    torrent_file.write_bytes(data)
    seed = _Seed(lt, data, src.parent)
    dl_dir = tmp_path / "dl"
    with BtDaemon("-d", str(dl_dir), "--bind", "127.0.0.1", "--rpc-secret", SECRET,
                  "--max-download-rate", "1M") as daemon:
        api = aria2p.API(aria2p.Client("http://127.0.0.1", daemon.rpc_port, secret=SECRET))
        events = _events(api)
        try:
            _until("the WebSocket listener", lambda: api.client.listening, 10)
            time.sleep(1.0)            # its socket connects in its thread
            dl = api.add_torrent(torrent_file)
            gid = dl.gid
            seed.connect(daemon.peer_port)
            _until("a connection and progress", lambda: (dl.update() or True) and
                   dl.connections >= 1 and dl.completed_length > 0, 30, daemon)
            assert [d.gid for d in api.get_downloads()] == [gid]
            meta = bt.parse_metainfo_untrusted(data)
            assert dl.name == "payload" and dl.total_length == meta.total_length
            assert dl.info_hash == meta.info_hash.hex()
            files = dl.files
            assert [str(f.path) for f in files][0] == str(dl_dir / "payload" / "file0.bin")
            assert files[0].length == SIZE
            peers = api.client.get_peers(gid)
            assert peers and peers[0]["ip"] == "127.0.0.1" and peers[0]["seeder"] == "true"
            # pause and resume
            assert api.pause([dl]) == [True]
            _until("paused", lambda: (dl.update() or True) and dl.status == "paused", 10)
            assert dl.connections == 0
            done_at_pause = dl.completed_length
            assert done_at_pause < dl.total_length
            assert api.resume([dl]) == [True]
            _until("active", lambda: (dl.update() or True) and dl.status == "active", 10)
            seed.connect(daemon.peer_port)          # in case it did not tell its listen port
            api.set_global_options({"max-overall-download-limit": "0"})
            _until("complete data", lambda: (dl.update() or True) and
                   dl.completed_length == dl.total_length, 60, daemon)
            assert dl.status == "active" and dl.seeder       # seeding, as aria2
            _until("the bt-complete notification", lambda: ("bt-complete", gid) in events, 10)
            for name in names:
                assert hashlib.sha256((dl_dir / "payload" / name).read_bytes()).digest() == \
                    hashlib.sha256((src / name).read_bytes()).digest()
            # remove (aria2p also removes the result)
            assert api.remove([dl]) == [True]
            _until("the complete notification", lambda: ("complete", gid) in events, 10)
            assert api.get_downloads() == []
            assert [e for e in events if e[1] == gid][:3] == [("start", gid), ("pause", gid),
                                                              ("start", gid)]
            assert api.client.shutdown() == "OK"
            assert daemon.wait(20) == 0
        finally:
            api.stop_listening()
    assert "bt daemon: stopped" in daemon.lines


def test_aria2p_adds_a_magnet(tmp_path):
    """aria2's two steps for a magnet: addUri's gid is the metadata
    download; once the metadata is in it is complete and ``followedBy``
    names the real download, whose ``following`` names it back."""
    lt = require_libtorrent()
    import aria2p
    src, names, data = bt_content(tmp_path, (300_000,), name="mag", piece_length=PIECE)
    seed = _Seed(lt, data, src.parent)
    info_hash = str(seed.handle.info_hash())
    magnet = f"magnet:?xt=urn:btih:{info_hash}&dn=mag"
    with BtDaemon("-d", str(tmp_path / "dl"), "--bind", "127.0.0.1") as daemon:
        api = aria2p.API(aria2p.Client("http://127.0.0.1", daemon.rpc_port))
        try:
            step = api.add_magnet(magnet)
        except aria2p.ClientException as exc:
            if "does not support magnet links" in str(exc):
                unavailable(f"this build's bt session has no magnet support: {exc}",
                            "the magnet issue (ut_metadata) adds it")
            raise
        seed.connect(daemon.peer_port)
        _until("the metadata step to complete", lambda: (step.update() or True) and
               step.status == "complete", 60, daemon)
        real_gid = step.followed_by_ids[0]
        real = api.get_download(real_gid)
        assert real.following_id == step.gid
        _until("the real download to finish", lambda: (real.update() or True) and
               real.completed_length == real.total_length > 0, 60, daemon)
        assert hashlib.sha256((tmp_path / "dl" / "mag" / names[0]).read_bytes()).digest() == \
            hashlib.sha256((src / names[0]).read_bytes()).digest()
