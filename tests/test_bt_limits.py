"""The session's global rate limits on loopback between two of our
sessions, real sockets and files: the measured rate of a 4 MiB transfer
holds within 15% of the limit (timed with trio's clock), for the upload
limit of a seed and for the download limit of a leecher that shares it
between two torrents; the limits change at runtime."""

from __future__ import annotations

import pytest
import trio

import bt
from bt.session import SessionError
from testsupport import bt_content

pytestmark = pytest.mark.slow       # ~4 s of rate-limited transfer each

MIB = 1024 * 1024
LIMIT = MIB                         # bytes/s
PIECE = 64 * 1024


def _content(root, name: str, size: int, seed: int):
    return bt_content(root, (size,), name=name, seed=seed, piece_length=PIECE, pad_files=False)


async def _timed_download(torrents) -> float:
    start = trio.current_time()
    with trio.fail_after(60):
        for t in torrents:
            await t.wait_finished()
    return trio.current_time() - start


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_upload_limit_of_a_seed(tmp_path, transport):
    _, _, data = _content(tmp_path, "up", 4 * MIB, 1)
    kw = {"utp": transport == "utp", "tcp": transport == "tcp", "host": "127.0.0.1"}
    async with bt.open_session(download_dir=tmp_path / "src", upload_limit=LIMIT, **kw) as s, \
            bt.open_session(download_dir=tmp_path / "dl", **kw) as ls:
        seed = await s.add_torrent(data)
        t = await ls.add_torrent(data)
        t.add_peer(("127.0.0.1", s.port))
        elapsed = await _timed_download([t])
        rate = 4 * MIB / elapsed
        print(f"{transport}: {rate / LIMIT:.3f} of the limit in {elapsed:.2f} s")
        assert 0.85 * LIMIT <= rate <= 1.15 * LIMIT, (rate, elapsed)
        assert seed.status().uploaded == 4 * MIB
        assert s.status().upload_limit == LIMIT and s.status().download_limit is None


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_download_limit_shared_by_two_torrents(tmp_path, transport):
    """Two 2 MiB torrents at once under one 1 MiB/s download limit: 4 MiB
    in about 4 s, whatever the socket buffers hold (unread bytes stay in
    the kernel, the limit is on what is read)."""
    _, _, a = _content(tmp_path / "a", "a", 2 * MIB, 2)
    _, _, b = _content(tmp_path / "b", "b", 2 * MIB, 3)
    kw = {"utp": transport == "utp", "tcp": transport == "tcp", "host": "127.0.0.1"}
    async with bt.open_session(download_dir=tmp_path / "a" / "src", **kw) as sa, \
            bt.open_session(download_dir=tmp_path / "b" / "src", **kw) as sb, \
            bt.open_session(download_dir=tmp_path / "dl", download_limit=LIMIT, **kw) as ls:
        await sa.add_torrent(a)
        await sb.add_torrent(b)
        ta = await ls.add_torrent(a)
        tb = await ls.add_torrent(b)
        ta.add_peer(("127.0.0.1", sa.port))
        tb.add_peer(("127.0.0.1", sb.port))
        elapsed = await _timed_download([ta, tb])
        rate = 4 * MIB / elapsed
        print(f"{transport}: {rate / LIMIT:.3f} of the limit in {elapsed:.2f} s")
        assert 0.85 * LIMIT <= rate <= 1.15 * LIMIT, (rate, elapsed)
        # both torrents moved data during the whole run, not one after the other
        assert ta.status().downloaded >= 2 * MIB and tb.status().downloaded >= 2 * MIB


async def test_limits_change_at_runtime(tmp_path):
    """A 4 MiB download starts at 256 KiB/s, then the limit is lifted: it
    finishes far sooner than the first limit allows."""
    _, _, data = _content(tmp_path, "rt", 4 * MIB, 4)
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                            download_limit=256 * 1024) as ls:
        await s.add_torrent(data)
        t = await ls.add_torrent(data)
        t.add_peer(("127.0.0.1", s.port))
        start = trio.current_time()
        await trio.sleep(2.0)
        got = t.status().downloaded
        assert got <= 256 * 1024 * 2 * 1.15 + 256 * 1024, got     # rate x time + burst
        ls.set_limits(upload=5 * MIB)                   # the download limit stays
        assert ls.status().download_limit == 256 * 1024 and ls.status().upload_limit == 5 * MIB
        ls.set_limits(download=None)
        assert ls.status().download_limit is None and ls.status().upload_limit == 5 * MIB
        with trio.fail_after(60):
            await t.wait_finished()
        assert trio.current_time() - start < 4 * MIB / (256 * 1024) / 2
        with pytest.raises(SessionError, match="upload limit must be"):
            ls.set_limits(upload=-1)
        with pytest.raises(SessionError, match="download limit must be"):
            ls.set_limits(download="1M")        # type: ignore[arg-type]


@pytest.mark.parametrize("transport", ["utp", "tcp"])
async def test_a_torrents_own_download_limit_under_the_sessions(tmp_path, transport):
    """Two 2 MiB torrents in one leecher: one with its own 1 MiB/s download
    limit (aria2's per-download max-download-limit), the other unlimited
    and finished long before; the limited one holds within 15%, and the
    session's global limit still applies to both (a chain of buckets)."""
    _, _, a = _content(tmp_path / "a", "a", 2 * MIB, 5)
    _, _, b = _content(tmp_path / "b", "b", 2 * MIB, 6)
    kw = {"utp": transport == "utp", "tcp": transport == "tcp", "host": "127.0.0.1"}
    async with bt.open_session(download_dir=tmp_path / "a" / "src", **kw) as sa, \
            bt.open_session(download_dir=tmp_path / "b" / "src", **kw) as sb, \
            bt.open_session(download_dir=tmp_path / "dl", **kw) as ls:
        await sa.add_torrent(a)
        await sb.add_torrent(b)
        ta = await ls.add_torrent(a)
        tb = await ls.add_torrent(b)
        ta.set_limits(download=LIMIT)
        assert ta.limits.download == LIMIT and tb.limits.download is None
        with pytest.raises(SessionError, match="download limit"):
            ta.set_limits(download=-1)
        ta.add_peer(("127.0.0.1", sa.port))
        tb.add_peer(("127.0.0.1", sb.port))
        start = trio.current_time()
        with trio.fail_after(60):
            await tb.wait_finished()
            unlimited = trio.current_time() - start
            await ta.wait_finished()
        elapsed = trio.current_time() - start
        rate = 2 * MIB / elapsed
        print(f"{transport}: {rate / LIMIT:.3f} of the torrent's limit in {elapsed:.2f} s; "
              f"the unlimited one in {unlimited:.2f} s")
        assert 0.85 * LIMIT <= rate <= 1.15 * LIMIT, (rate, elapsed)
        assert unlimited < elapsed / 2
        # the session's limit is the parent: a global limit now caps both
        ls.set_limits(download=LIMIT // 2)
        assert ta.limits.parent is ls.limits and ls.limits.download == LIMIT // 2
