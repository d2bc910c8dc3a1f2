"""Download events (bt.events) and gids on real sessions over loopback:
every event of a download's life in order, for sync and async listeners
and events() iterators together; listeners that raise or are slow;
iterators that never read; gids given and generated."""

from __future__ import annotations

import logging
import os
import re

import pytest
import trio

import bt
from bt.events import DownloadEvent, EventKind
from testsupport import bt_content

PIECE = 32 * 1024
SIZES = (300_000, 0, 170_001, 123_456)

START, PAUSE, STOP, COMPLETE, ERROR, BT_COMPLETE = (
    EventKind.START, EventKind.PAUSE, EventKind.STOP, EventKind.COMPLETE, EventKind.ERROR,
    EventKind.BT_COMPLETE)


def _content(root, sizes=SIZES):
    return bt_content(root, sizes, seed=5, piece_length=PIECE)


async def _until(pred, timeout: float = 30.0, poll: float = 0.02) -> None:
    with trio.fail_after(timeout):
        while not pred():
            await trio.sleep(poll)


class Recorder:
    """A sync listener, an async listener and an iterator on one session,
    each keeping (gid, kind) in the order it got them."""

    def __init__(self, session, nursery) -> None:
        self.sync: list[tuple[str, EventKind]] = []
        self.async_: list[tuple[str, EventKind]] = []
        self.iterated: list[tuple[str, EventKind]] = []
        self.events: list[DownloadEvent] = []
        session.add_listener(self.on_sync)
        session.add_listener(self.on_async)
        stream = session.events()
        nursery.start_soon(self._read, stream)

    def on_sync(self, ev: DownloadEvent) -> None:
        self.sync.append((ev.gid, ev.kind))
        self.events.append(ev)

    async def on_async(self, ev: DownloadEvent) -> None:
        await trio.sleep(0)
        self.async_.append((ev.gid, ev.kind))

    async def _read(self, stream) -> None:
        async for ev in stream:
            self.iterated.append((ev.gid, ev.kind))

    def kinds(self, gid: str) -> list[EventKind]:
        return [k for g, k in self.sync if g == gid]

    async def agree(self) -> None:
        """The async listener and the iterator caught up with the sync one."""
        await _until(lambda: self.async_ == self.sync and self.iterated == self.sync)


async def test_a_downloads_life_in_order_for_every_kind_of_listener(tmp_path):
    _, _, data = _content(tmp_path)
    async with trio.open_nursery() as nursery:
        async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
                bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1",
                                download_limit=300_000) as ls:
            rec = Recorder(ls, nursery)
            seed_rec = Recorder(s, nursery)
            seed = await s.add_torrent(data)
            # added complete: started, and its data is complete at once (aria2
            # fires onBtDownloadComplete after the hash check by default)
            assert seed_rec.kinds(seed.gid) == [START, BT_COMPLETE]
            t = await ls.add_torrent(data)
            assert rec.kinds(t.gid) == [START]
            first = rec.events[0]
            assert first.gid == t.gid and first.name == "content" and first.torrent is t
            assert first.method == "aria2.onDownloadStart" and first.status.state == "downloading"
            assert abs(first.timestamp - __import__("time").time()) < 60
            t.add_peer(("127.0.0.1", s.port))
            await _until(lambda: t.status().pieces_have >= 2)
            await t.pause()
            await t.pause()                     # nothing new
            assert rec.kinds(t.gid) == [START, PAUSE]
            await t.resume()
            assert rec.kinds(t.gid) == [START, PAUSE, START]
            with trio.fail_after(60):
                await t.wait_finished()
            assert rec.kinds(t.gid) == [START, PAUSE, START, BT_COMPLETE]
            bt_done = rec.events[-1]
            assert bt_done.status.state == "seeding" and bt_done.status.progress == 1.0
            # a pause and resume of a seed: no second BT_COMPLETE
            await t.pause()
            await t.resume()
            await t.force_recheck()             # a running download: not started again
            assert rec.kinds(t.gid) == [START, PAUSE, START, BT_COMPLETE, PAUSE, START]
            # removing a seed ends a finished download: complete
            await ls.remove_torrent(t)
            assert rec.kinds(t.gid) == [START, PAUSE, START, BT_COMPLETE, PAUSE, START,
                                        COMPLETE]
            await rec.agree()
            # the seed is still running when its session closes: complete
        assert seed_rec.kinds(seed.gid) == [START, BT_COMPLETE, COMPLETE]
        assert seed_rec.async_ == seed_rec.sync         # delivered during the close
        # the iterators ended with their sessions
        await _until(lambda: seed_rec.iterated == seed_rec.sync)
    assert ls.status().counters["events.start"] == 3
    assert ls.status().counters["events.complete"] == 1
    assert "events.dropped" not in ls.status().counters


async def test_stop_when_removed_or_closed_without_the_data(tmp_path):
    _, _, data = _content(tmp_path)
    _, _, data2 = bt_content(tmp_path / "b", (50_000,), seed=9, piece_length=PIECE)
    async with trio.open_nursery() as nursery:
        async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
            rec = Recorder(ls, nursery)
            t = await ls.add_torrent(data)
            t2 = await ls.add_torrent(data2)
            p = await ls.add_torrent(bt_content(tmp_path / "c", (10_000,), seed=2)[2])
            await p.pause()
            await ls.remove_torrent(t)
            assert rec.kinds(t.gid) == [START, STOP]
        assert rec.kinds(t2.gid) == [START, STOP]           # the close stopped it
        assert rec.kinds(p.gid) == [START, PAUSE]           # paused: stays waiting
        await _until(lambda: rec.iterated == rec.sync and rec.async_ == rec.sync)


async def test_a_storage_error_is_an_error_event(tmp_path):
    """A symlink leading out of the download directory appears under the
    torrent's directory: the first write there fails, the torrent stops
    with an error (start -> error); removing it then adds nothing; a resume
    starts it again."""
    src, names, data = _content(tmp_path)
    outside = tmp_path / "outside"
    outside.mkdir()
    async with trio.open_nursery() as nursery:
        async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
                bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
            rec = Recorder(ls, nursery)
            seed = await s.add_torrent(data)
            t = await ls.add_torrent(data)
            (tmp_path / "dl" / "content").mkdir(parents=True, exist_ok=True)
            os.symlink(outside, tmp_path / "dl" / "content" / "sub")
            t.add_peer(("127.0.0.1", s.port))
            await _until(lambda: t.state == "error")
            assert rec.kinds(t.gid) == [START, ERROR]
            err = rec.events[-1]
            assert err.status.error and "refusing" in err.status.error
            assert err.method == "aria2.onDownloadError"
            await _until(lambda: not seed.peers)       # (else our redial is a duplicate)
            await t.resume()
            assert rec.kinds(t.gid) == [START, ERROR, START]
            await _until(lambda: t.state == "error")
            await ls.remove_torrent(t)
            assert rec.kinds(t.gid) == [START, ERROR, START, ERROR]
            await rec.agree()
    assert list(outside.iterdir()) == []


async def test_listeners_that_raise_or_are_slow_break_nothing(tmp_path, caplog):
    """A sync and an async listener that raise are logged and counted, the
    others still get every event; a slow async listener and an iterator
    nobody reads neither slow the download nor grow without bound: their
    oldest events are dropped and counted."""
    _, _, data = _content(tmp_path)
    caplog.set_level(logging.ERROR, logger="bt.events")
    async with bt.open_session(download_dir=tmp_path / "src", host="127.0.0.1") as s, \
            bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
        got: list[EventKind] = []
        slow_got: list[EventKind] = []

        def bad(ev):
            raise RuntimeError("sync listener bug")

        async def bad_async(ev):
            raise RuntimeError("async listener bug")

        async def slow(ev):
            slow_got.append(ev.kind)
            await trio.sleep_forever()

        ls.add_listener(bad)
        ls.add_listener(bad_async)
        ls.add_listener(slow, queue=2)
        ls.add_listener(lambda ev: got.append(ev.kind))
        unread = ls.events(queue=2)
        with pytest.raises(ValueError, match="already registered"):
            ls.add_listener(bad)
        await s.add_torrent(data)
        t = await ls.add_torrent(data)
        t.add_peer(("127.0.0.1", s.port))
        with trio.fail_after(60):
            await t.wait_finished()
        for _ in range(3):
            await t.pause()
            await t.resume()
        assert got == [START, BT_COMPLETE] + [PAUSE, START] * 3
        await _until(lambda: ls.counters["events.listener_errors"] == 2 * len(got))
        assert slow_got == [START]                      # still in its first call
        # 8 events: the slow one holds 1 and queues 2; the iterator keeps 2
        assert ls.counters["events.dropped"] == (8 - 1 - 2) + (8 - 2)
        assert unread.dropped == 6
        assert [ev.kind for ev in list(unread.queue)] == [PAUSE, START]
        assert ls.status().counters["events.dropped"] == 11
        ls.remove_listener(bad)
        ls.remove_listener(slow)
        rec = Recorder.__new__(Recorder)            # bound methods made again are the same
        rec.sync, rec.async_, rec.events = [], [], []
        ls.add_listener(rec.on_async)
        with pytest.raises(ValueError, match="already registered"):
            ls.add_listener(rec.on_async)
        ls.remove_listener(rec.on_async)
        with pytest.raises(ValueError, match="not registered"):
            ls.remove_listener(slow)
        await t.pause()
        assert got[-1] == PAUSE and ls.counters["events.listener_errors"] >= 17
    messages = [r.getMessage() for r in caplog.records]
    assert any("failed on start" in m for m in messages)
    assert any("sync listener bug" in (r.exc_text or "") or
               (r.exc_info and "sync listener bug" in str(r.exc_info[1])) for r in caplog.records)


async def test_gids(tmp_path):
    _, _, data = _content(tmp_path)
    _, _, data2 = bt_content(tmp_path / "b", (50_000,), seed=9, piece_length=PIECE)
    _, _, data3 = bt_content(tmp_path / "c", (50_000,), seed=10, piece_length=PIECE)
    async with bt.open_session(download_dir=tmp_path / "dl", host="127.0.0.1") as ls:
        t = await ls.add_torrent(data)
        assert re.fullmatch(r"[0-9a-f]{16}", t.gid)
        assert ls.torrent_by_gid(t.gid) is t and ls.torrent_by_gid(t.gid.upper()) is t
        for bad in ("123", "g" * 16, "0" * 16, t.gid + "0", 12):
            with pytest.raises(ValueError, match="16 hex digits"):
                await ls.add_torrent(data2, gid=bad)
        with pytest.raises(ValueError, match=f"gid {t.gid} is already used"):
            await ls.add_torrent(data2, gid=t.gid)
        assert len(ls.torrents) == 1
        t2 = await ls.add_torrent(data2, gid="00000000000000AB")
        assert t2.gid == "00000000000000ab" and ls.torrent_by_gid("00000000000000ab") is t2
        gid = t.gid
        await ls.remove_torrent(t)
        assert t.gid == gid and ls.torrent_by_gid(gid) is None
        t3 = await ls.add_torrent(data3, gid=gid)     # a restored download takes it back
        assert ls.torrent_by_gid(gid) is t3
        assert ls.torrent_by_gid("nonsense") is None


async def test_the_initial_check_is_state_checking_and_a_removal_during_it(tmp_path):
    """add_torrent's data check is visible: the torrent is in the session
    (by infohash and gid) in state ``checking`` while it hashes, the state
    listeners hear None -> checking -> seeding; removed during that check,
    it never starts (no events) and add_torrent hands back the removed
    torrent."""
    src, _, data = bt_content(tmp_path, (6_000_000, 2_000_000), seed=4, piece_length=PIECE)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1",
                               resume_dir=tmp_path / "none") as s:
        seen: list[tuple[str | None, str, float | None]] = []
        s.state_listeners.append(lambda t, old, new: seen.append(
            (old and str(old), str(new), t.status().checking_progress)))
        kinds: list[EventKind] = []
        s.add_listener(lambda ev: kinds.append(ev.kind))
        during: list[tuple[str, str]] = []
        async with trio.open_nursery() as nursery:
            async def watch():
                await _until(lambda: bool(s.torrents), poll=0)
                t = next(iter(s.torrents.values()))
                assert s.torrent_by_gid(t.gid) is t
                during.append((str(t.state), str(t.status().state)))
            nursery.start_soon(watch)
            t = await s.add_torrent(data)
        assert during == [("checking", "checking")]
        assert seen == [(None, "checking", 0.0), ("checking", "seeding", None)]
        assert kinds == [START, BT_COMPLETE]
        await s.remove_torrent(t)
        seen.clear()
        kinds.clear()
        (tmp_path / "none").mkdir(exist_ok=True)
        for f in (tmp_path / "none").iterdir():
            f.unlink()                          # no resume file: it hashes again
        got: list[bt.Torrent] = []
        async with trio.open_nursery() as nursery:
            async def add():
                got.append(await s.add_torrent(data))
            nursery.start_soon(add)
            await _until(lambda: bool(s.torrents), poll=0)
            checking = next(iter(s.torrents.values()))
            await s.remove_torrent(checking)
        assert got == [checking] and checking.state == "removed"
        assert not s.torrents and s.torrent_by_gid(checking.gid) is None
        assert [(o, n) for o, n, _ in seen] == [(None, "checking"), ("checking", "removed")]
        assert kinds == []


async def test_the_close_waits_for_a_stuck_listener_only_its_grace(tmp_path, caplog):
    """At the close a running download's last event (``complete`` here) is
    still handed to the async listeners; one stuck forever is cancelled
    after ``close_grace`` (logged), and the close goes on."""
    caplog.set_level(logging.WARNING, logger="bt.events")
    src, _, data = _content(tmp_path)
    got: list[EventKind] = []
    stuck_on: list[EventKind] = []

    async def quick(ev):
        got.append(ev.kind)

    async def stuck(ev):
        stuck_on.append(ev.kind)
        if ev.kind is COMPLETE:
            await trio.sleep_forever()

    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as s:
        s.notifier.close_grace = 0.5
        s.add_listener(quick)
        s.add_listener(stuck)
        await s.add_torrent(data)
        await _until(lambda: got == [START, BT_COMPLETE])
        closing = trio.current_time()
    assert trio.current_time() - closing < 10           # not forever
    assert got == [START, BT_COMPLETE, COMPLETE] and stuck_on == got
    assert any("still busy after 0.5 s were cancelled" in r.getMessage()
               for r in caplog.records)
    s.notifier.start_soon(trio.sleep, 0)                # too late: dropped, logged
    assert "not started" in caplog.records[-1].getMessage()


async def test_an_iterator_closed_ends_after_its_queue(tmp_path):
    src, _, data = _content(tmp_path)
    async with bt.open_session(download_dir=src.parent, host="127.0.0.1") as s:
        read: list[EventKind] = []
        async with s.events() as stream:
            t = await s.add_torrent(data)               # start, bt-complete queued
            async with trio.open_nursery() as nursery:
                async def reader():
                    async for ev in stream:
                        read.append(ev.kind)
                nursery.start_soon(reader)
                await _until(lambda: read == [START, BT_COMPLETE])
                stream.close()                          # the waiting reader ends
            await t.pause()
        assert read == [START, BT_COMPLETE] and not stream.queue    # pause: not queued
        with pytest.raises(ValueError, match=">= 1"):
            s.events(queue=0)
