"""``python -m bt.bench --magnet``: time from a magnet link to the first
byte and to finished, on loopback, with the DHT as the only lead (no
tracker, no ``x.pe``).

Pairings (seed -> leecher), each a fresh swarm of fresh nodes:

- ``ours<-ours``: our seed's DHT node is the leecher's bootstrap node;
- ``ours<-lt``: libtorrent seeds with its DHT on and is our only
  bootstrap node (it is asked to announce once a second, as its 15-minute
  cadence would otherwise decide the figure);
- ``lt<-ours``: libtorrent fetches our seed from the link, through a
  third (libtorrent) DHT node both know;
- ``lt<-lt``: the reference, libtorrent to libtorrent the same way.

For each: seconds from adding the link to the info dictionary (metadata),
to the first payload byte, and to the last verified piece.  Everything
runs in this process (libtorrent in its own threads), polled every 10 ms.
Numbers are printed; nothing is asserted.
"""

from __future__ import annotations

import argparse
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import trio

__all__ = ["main", "PAIRINGS"]

MiB = 1 << 20
PAIRINGS = ("ours<-ours", "ours<-lt", "lt<-ours", "lt<-lt")
_POLL = 0.01


def _lt_dht_session(lt: Any) -> Any:
    from .bench import libtorrent_settings
    s = libtorrent_settings("127.0.0.1", "both")
    s.update({"enable_dht": True, "dht_restrict_routing_ips": False,
              "dht_restrict_search_ips": False, "dht_block_ratelimit": 100000,
              "dht_bootstrap_nodes": ""})
    return lt.session(s)


def _lt_add(lt: Any, ses: Any, *, data: bytes | None = None, link: str | None = None,
            save: Path) -> Any:
    if data is not None:
        atp = lt.add_torrent_params()
        atp.ti = lt.torrent_info(lt.bdecode(data))
    else:
        atp = lt.parse_magnet_uri(link)
    atp.save_path = str(save)
    return ses.add_torrent(atp)


class _Times:
    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.metadata: float | None = None
        self.first: float | None = None
        self.done: float | None = None

    def mark(self, metadata: bool, have_bytes: bool, done: bool) -> bool:
        now = time.monotonic() - self.t0
        if metadata and self.metadata is None:
            self.metadata = now
        if have_bytes and self.first is None:
            self.first = now
        if done and self.done is None:
            self.done = now
        return self.done is not None


async def _poll(check: Callable[[], bool], timeout: float) -> None:
    with trio.fail_after(timeout):
        while not check():
            await trio.sleep(_POLL)


async def _run(pairing: str, data: bytes, content: Path, work: Path, timeout: float) -> _Times:
    import bt
    from .magnet import magnet_from_metainfo
    from .metainfo import parse_metainfo_untrusted
    link = str(magnet_from_metainfo(parse_metainfo_untrusted(data)))
    seed_kind, leech_kind = pairing.split("<-")[1], pairing.split("<-")[0]
    lt = None
    if "lt" in pairing:
        import libtorrent as lt
    sessions: list[Any] = []
    try:
        async with trio.open_nursery() as nursery:
            # the seed
            if seed_kind == "ours":
                seed_ses = await nursery.start(_our_session, content.parent, [])
                await seed_ses.add_torrent(data)
                seed_port = seed_ses.port
            else:
                lts = _lt_dht_session(lt)
                sessions.append(lts)
                h = _lt_add(lt, lts, data=data, save=content.parent)
                await _poll(lambda: h.status().state == lt.torrent_status.seeding, 30)
                seed_port = lts.listen_port()

                async def announce_often() -> None:
                    while True:
                        await trio.sleep(1.0)
                        h.force_dht_announce()
                nursery.start_soon(announce_often)
            # the leecher, from the link alone
            dl = work / f"dl-{pairing.replace('<-', '-from-')}"
            if leech_kind == "ours":
                leech_ses = await nursery.start(_our_session, dl, [("127.0.0.1", seed_port)])
                times = _Times()
                t = await leech_ses.add_torrent(link)
                await _poll(lambda: times.mark(t.has_metadata, t.status().downloaded > 0,
                                               t.finished), timeout)
            else:
                helper = _lt_dht_session(lt)
                leecher = _lt_dht_session(lt)
                sessions += [helper, leecher]
                helper.add_dht_node(("127.0.0.1", seed_port))
                leecher.add_dht_node(("127.0.0.1", helper.listen_port()))
                if seed_kind == "lt":
                    sessions[0].add_dht_node(("127.0.0.1", helper.listen_port()))
                await trio.sleep(0)
                times = _Times()
                h2 = _lt_add(lt, leecher, link=link, save=dl)

                def lt_check() -> bool:
                    st = h2.status()
                    return times.mark(st.has_metadata, st.total_payload_download > 0,
                                      st.state == lt.torrent_status.seeding)
                await _poll(lt_check, timeout)
            nursery.cancel_scope.cancel()
    finally:
        for s in sessions:
            s.pause()
        sessions.clear()
    return times


async def _our_session(download_dir: Path, bootstrap: list[tuple[str, int]],
                       task_status: Any = trio.TASK_STATUS_IGNORED) -> None:
    import bt
    async with bt.open_session(download_dir=download_dir, host="127.0.0.1",
                               dht_bootstrap=bootstrap) as ses:
        task_status.started(ses)
        await trio.sleep_forever()


def _fmt(x: float | None) -> str:
    return f"{x:8.2f}" if x is not None else "       -"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bt.bench --magnet",
                                 description="Seconds from a magnet link to metadata, first "
                                             "byte and finished; loopback, DHT only.")
    ap.add_argument("--size-mib", type=int, default=16, help="payload size (default 16)")
    ap.add_argument("--only", metavar="RUN[,RUN...]", help="among " + ", ".join(PAIRINGS))
    ap.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    args = ap.parse_args(argv)
    runs = PAIRINGS if not args.only else tuple(n.strip() for n in args.only.split(","))
    bad = [r for r in runs if r not in PAIRINGS]
    if bad:
        ap.error(f"--only: unknown run {bad[0]!r}")
    if any("lt" in r for r in runs):
        try:
            import libtorrent  # noqa: F401
        except ImportError as exc:
            print(f"bt.bench: libtorrent is not importable ({exc})")
            return 2
    from .create import create_torrent
    work = Path(tempfile.mkdtemp(prefix="bt-bench-magnet-"))
    ok = True
    try:
        content = work / "src" / "payload.bin"
        content.parent.mkdir(parents=True)
        content.write_bytes(random.Random(9).randbytes(args.size_mib * MiB))
        data = create_torrent(content, piece_length=256 * 1024)
        print(f"bt.bench --magnet: {args.size_mib} MiB, loopback, DHT only; seconds from "
              f"adding the link")
        print(f"{'run':<12}{'metadata':>9}{'1st byte':>9}{'finished':>9}")
        for run in runs:
            try:
                t = trio.run(_run, run, data, content, work, args.timeout)
            except trio.TooSlowError:
                print(f"{run:<12} TIMEOUT after {args.timeout:.0f} s")
                ok = False
                continue
            print(f"{run:<12}{_fmt(t.metadata)} {_fmt(t.first)} {_fmt(t.done)}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1
