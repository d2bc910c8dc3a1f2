"""Magnet links through the DHT against libtorrent (PyPI, in this process),
on loopback, no tracker and no ``x.pe``:

- libtorrent seeds with its DHT on; our session knows only the magnet link
  and libtorrent's node as its one DHT bootstrap node: it finds libtorrent
  through the DHT, fetches the info dictionary with ut_metadata from it and
  downloads the data;
- the reverse: our session seeds and announces in the DHT; libtorrent,
  given only the magnet link and a DHT node, finds us and fetches metadata
  and data from us.

sha256 of every file must match.  See ../shared/PEERS.md for libtorrent's
DHT-on-loopback settings.
"""

from __future__ import annotations

import pytest
import trio

import bt
from bt.bench import libtorrent_settings
from bt.magnet import magnet_from_metainfo
from bt.metainfo import parse_metainfo_untrusted
from testsupport import bt_content, sha256_files, unavailable

try:
    import libtorrent as lt
except ImportError as exc:   # pragma: no cover - depends on the machine
    lt = None
    _why = f"libtorrent is not importable ({exc}); pip install libtorrent"

pytestmark = [pytest.mark.interop, pytest.mark.slow]

SIZES = (1_500_000, 0, 300_001, 77_777)


def _need_lt() -> None:
    if lt is None:
        unavailable(_why, "libtorrent is in the test extra; .ci/run installs it")


def lt_dht_session():
    """libtorrent on 127.0.0.1 with its DHT on, loopback restrictions off,
    no bootstrap host (PEERS.md)."""
    s = libtorrent_settings("127.0.0.1", "both")
    s.update({"enable_dht": True, "dht_restrict_routing_ips": False,
              "dht_restrict_search_ips": False, "dht_block_ratelimit": 100000,
              "dht_bootstrap_nodes": "",
              "alert_mask": lt.alert_category.dht_operation | lt.alert_category.dht})
    return lt.session(s)


async def test_our_magnet_download_from_libtorrent_found_via_its_dht(tmp_path):
    _need_lt()
    src, names, data = bt_content(tmp_path, SIZES, name="multi", seed=11)
    meta = parse_metainfo_untrusted(data)
    ses = lt_dht_session()
    atp = lt.add_torrent_params()
    atp.ti = lt.torrent_info(lt.bdecode(data))
    atp.save_path = str(src.parent)
    handle = ses.add_torrent(atp)
    lt_port = ses.listen_port()
    try:
        with trio.fail_after(20):
            while handle.status().state != lt.torrent_status.seeding:
                await trio.sleep(0.05)
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                   dht_bootstrap=[("127.0.0.1", lt_port)]) as ours, \
                trio.open_nursery() as nursery:
            async def lt_announces() -> None:
                # libtorrent announces every 15 minutes; once our node is in
                # its table (we bootstrapped from it), ask for one now
                while True:
                    await trio.sleep(1.0)
                    handle.force_dht_announce()
            nursery.start_soon(lt_announces)
            t = await ours.add_torrent(str(magnet_from_metainfo(meta)))
            assert t.status().state == "metadata"
            with trio.fail_after(90):
                await t.wait_metadata()
                assert t.meta.info_hash == meta.info_hash
                await t.wait_finished()
            # no x.pe, no tracker: the DHT was the only lead (libtorrent may
            # find our announce first and dial us, or we find its)
            assert t.counters["dht.announces"] >= 1
            assert t.counters["metadata.fetched"] == 1
            assert t.status().transfers[0].downloaded >= sum(SIZES)
            nursery.cancel_scope.cancel()
    finally:
        ses.remove_torrent(handle)
        del ses
    assert sha256_files(tmp_path / "dl" / "multi", names) == sha256_files(src, names)


async def test_libtorrent_magnet_download_from_our_seed_found_via_dht(tmp_path):
    _need_lt()
    src, names, data = bt_content(tmp_path, SIZES, name="multi", seed=12)
    meta = parse_metainfo_untrusted(data)
    helper = lt_dht_session()          # a third DHT node, so lookups have someone to ask
    leecher = lt_dht_session()
    hp, lp = helper.listen_port(), leecher.listen_port()
    helper.add_dht_node(("127.0.0.1", lp))
    leecher.add_dht_node(("127.0.0.1", hp))
    handle = None
    try:
        async with bt.open_session(download_dir=src.parent, host="127.0.0.1",
                                   dht_bootstrap=[("127.0.0.1", hp)]) as ours:
            t = await ours.add_torrent(data)
            assert t.status().state == "seeding"
            # libtorrent knows the link only: no peer, no tracker
            atp = lt.parse_magnet_uri(str(magnet_from_metainfo(meta)))
            atp.save_path = str(tmp_path / "lt")
            handle = leecher.add_torrent(atp)
            with trio.fail_after(120):
                while handle.status().state != lt.torrent_status.seeding:
                    if handle.status().state == lt.torrent_status.downloading_metadata:
                        handle.force_dht_announce()      # re-run its get_peers sooner
                    await trio.sleep(1.0)
            assert t.status().uploaded >= sum(SIZES)
            assert ours.dht_torrents.counters["announces"] >= 1
    finally:
        if handle is not None:
            leecher.remove_torrent(handle)
        del leecher, helper
    assert sha256_files(tmp_path / "lt" / "multi", names) == sha256_files(src, names)
