"""A mixed swarm of real peers on loopback: one libtorrent seed (PyPI, in
this process), two of our sessions and one Transmission 3.00 as leechers,
on one multi-file torrent.  Peers are introduced by address (no tracker):
our leechers dial the seed, each other and Transmission (which cannot be
told to dial anyone); the seed dials Transmission.

The seed's upload is capped (its local peer class: libtorrent exempts
loopback peers from the global limit), so the seed alone would take
~8 s per copy and the leechers have to trade.  Every leecher must finish
with sha256 equal for every file, and each of our sessions must have
uploaded payload to the other (the torrents' per-peer transfer totals)."""

from __future__ import annotations

import pytest
import trio

import bt
from bt.bench import libtorrent_settings
from testsupport import bt_content, require_libtorrent, sha256_files, unavailable
from utp.bench.peers import TransmissionPeer

pytestmark = [pytest.mark.interop, pytest.mark.slow]

PIECE = 64 * 1024
#: ~16 MiB in 256 pieces, no empty file (Transmission 3.00 creates none)
#: and no pad files (it predates BEP 47 and wants them on disk).
SIZES = (7_000_000, 123_457, 5_000_000, 1_048_576, 3_604_183)
SEED_UPLOAD = 2 * 1024 * 1024          # bytes/s, the seed's whole upload
#: Generous on 2 busy cores: Transmission waits ~10 s to unchoke and ~10 s
#: to request (PEERS.md); a copy from the capped seed alone takes ~8 s.
FINISH_TIMEOUT = 240


async def test_libtorrent_seed_two_of_ours_and_transmission(tmp_path):
    lt = require_libtorrent()
    why = TransmissionPeer.missing()
    if why is not None:
        unavailable(why, ".ci/run installs transmission-daemon")
    src, names, data = bt_content(tmp_path, SIZES, name="swarm", seed=13, piece_length=PIECE,
                                  pad_files=False)
    want = sha256_files(src, names)
    ses = lt.session(libtorrent_settings("127.0.0.1", "both"))
    ses.set_peer_class(lt.session.local_peer_class_id, {"upload_limit": SEED_UPLOAD})
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(src.parent)
    atp.flags |= lt.torrent_flags.seed_mode
    handle = ses.add_torrent(atp)
    try:
        with trio.fail_after(20):
            while not handle.status().is_seeding:
                await trio.sleep(0.05)
        async with TransmissionPeer(tmp_path / "tr") as tr:
            tr_port = tr.port
            await tr.add(data, tmp_path / "tr", seed=False)     # it drops peers while checking
            handle.connect_peer(("127.0.0.1", tr_port))
            async with bt.open_session(download_dir=tmp_path / "a", host="127.0.0.1") as a, \
                    bt.open_session(download_dir=tmp_path / "b", host="127.0.0.1") as b:
                ta = await a.add_torrent(data)
                tb = await b.add_torrent(data)
                for t in (ta, tb):
                    t.add_peer(("127.0.0.1", ses.listen_port()))
                    t.add_peer(("127.0.0.1", tr_port))
                ta.add_peer(("127.0.0.1", b.port))
                with trio.fail_after(FINISH_TIMEOUT):
                    await ta.wait_finished()
                    await tb.wait_finished()
                    while (await tr.status())["progress"] != 1:
                        await trio.sleep(0.2)
                sa, sb = ta.status(), tb.status()
                diag = (a.counters, b.counters, ta.counters, tb.counters, sa, sb)
                a_to_b = sum(x.uploaded for x in sa.transfers if x.peer_id == b.peer_id)
                b_to_a = sum(x.uploaded for x in sb.transfers if x.peer_id == a.peer_id)
                assert a_to_b > 0 and b_to_a > 0, diag
                # what one of ours got from the other is what the other sent it
                assert sum(x.downloaded for x in sb.transfers if x.peer_id == a.peer_id) \
                    <= a_to_b, diag
                assert ta.counters["pieces.failed"] == tb.counters["pieces.failed"] == 0, diag
    finally:
        ses.remove_torrent(handle)
        del ses
    for where in (tmp_path / "a", tmp_path / "b", tmp_path / "tr"):
        assert sha256_files(where / "swarm", names) == want, where
