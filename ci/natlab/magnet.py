"""A magnet download across two NATs with nothing but a DHT node between
the peers (issue 9; ``python -m ci.natlab magnet``, tests/test_natlab_magnet.py).

A DHT node (``dht serve``) on the lab's internet; our seed behind one
port-restricted NAT, our leecher behind another, each session told only
the DHT node's address.  The seed announces the torrent; the leecher gets
nothing but ``magnet:?xt=urn:btih:...``.  It finds the seed through the
DHT, fetches the info dictionary (ut_metadata) and the data from it; the
seed finds the leecher the same way.  Neither NAT lets in a packet its
host did not ask for, so the connection exists only because both sides
sent toward each other's public address (each dials the other once the
DHT names it, and a torrent redials while it has no peer): a hole punched
through both NATs on the shared uTP port.

:func:`run_magnet` returns, per run, the leecher's times from adding the
link to the metadata, the first byte and the last, and what each side saw
of the other (addresses, transport, bytes), with the data checked.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from typing import Any, Callable

__all__ = ["run_magnet", "format_magnet", "PEER_PORT", "DHT_PORT"]

PEER_PORT = 40000
DHT_PORT = 6881

# One peer: ROLE seed|leech, the torrent (a .torrent path for the seed, a
# magnet link for the leecher), the download dir, our IP, the DHT node's
# HOST:PORT.  The seed prints "ready" once its torrent runs, and its result
# as JSON when stdin closes; the leecher prints its result when done.
_PEER = textwrap.dedent("""
    import json, sys, time, trio, bt
    role, what, ddir, ip, dht_at, port = sys.argv[1:7]
    h, p = dht_at.rsplit(":", 1)
    async def main():
        async with bt.open_session(download_dir=ddir, host=ip, port=int(port), tcp=False,
                                   dht=True, dht_bootstrap=[(h, int(p))]) as s:
            t0 = time.monotonic()
            marks, seen = {}, {}
            t = await s.add_torrent(open(what, "rb").read() if role == "seed" else what)
            async def watch():
                # every connection seen (a finished pair of seeds hangs up
                # at once, so the live list at the end may be empty)
                while True:
                    if "metadata" not in marks and t.has_metadata:
                        marks["metadata"] = time.monotonic() - t0
                    if "first_byte" not in marks and t.status().downloaded > 0:
                        marks["first_byte"] = time.monotonic() - t0
                    for x in list(t.peers):
                        seen[(x.peer_id.hex(), tuple(x.addr))] = x.transport
                    await trio.sleep(0.01)
            with trio.fail_after(120 if role == "leech" else 600):
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(watch)
                    if role == "seed":
                        print("ready", flush=True)
                        await trio.to_thread.run_sync(sys.stdin.read)
                    else:
                        await t.wait_finished()
                        marks["finished"] = time.monotonic() - t0
                    nursery.cancel_scope.cancel()
            print(json.dumps({
                "marks": marks, "peer_id": s.peer_id.hex(), "session": dict(s.counters),
                "peers": [{"peer_id": pid, "addr": list(addr), "transport": tr}
                          for (pid, addr), tr in seen.items()],
                "transfers": {x.peer_id.hex(): [x.downloaded, x.uploaded]
                              for x in t.status().transfers}}), flush=True)
    trio.run(main)
""")


def run_magnet(size: int = 4 << 20, *, repeat: int = 1, piece_length: int = 256 * 1024,
               progress: Callable[[str], None] | None = None) -> list[dict[str, Any]]:
    """``repeat`` runs, each in a fresh lab (as root); per run a dict:
    ``marks`` (seconds to metadata, first byte, finished), ``leech`` and
    ``seed`` (each side's report: every connection it had, the bytes per
    peer, its counters), ``seed_public`` / ``leech_public`` (the
    NATs' addresses), ``sha256_ok`` and ``exits`` (each side's exit status
    and the end of its stderr).  RuntimeError if a side fails."""
    from bt.create import create_torrent
    from bt.metainfo import parse_metainfo_untrusted

    from . import Lab, read_line
    from .matrix import _python_env

    env = _python_env()
    out = []
    for n in range(repeat):
        with Lab() as lab:
            node = lab.add_host("dht", "none")
            seed = lab.add_host("seed", "restricted")
            leech = lab.add_host("leech", "restricted")
            d = lab.tempdir()
            os.makedirs(f"{d}/seed")
            payload = os.urandom(size)
            with open(f"{d}/seed/blob.bin", "wb") as f:
                f.write(payload)
            data = create_torrent(f"{d}/seed/blob.bin", piece_length=piece_length)
            with open(f"{d}/t.torrent", "wb") as f:
                f.write(data)
            magnet = f"magnet:?xt=urn:btih:{parse_metainfo_untrusted(data).info_hash.hex()}"
            ip, port = lab.start_dht_node(node, DHT_PORT, env=env)
            dht_at = f"{ip}:{port}"
            seed_proc = seed.popen([sys.executable, "-c", _PEER, "seed", f"{d}/t.torrent",
                                    f"{d}/seed", seed.ip, dht_at, str(PEER_PORT)],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, env=env, text=True)
            if read_line(seed_proc, "seed", 30) != "ready":
                raise RuntimeError("the seed did not start")
            leech_proc = leech.popen([sys.executable, "-c", _PEER, "leech", magnet,
                                      f"{d}/leech", leech.ip, dht_at, str(PEER_PORT)],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=env, text=True)
            got = json.loads(read_line(leech_proc, "the leecher's result", 150))
            assert seed_proc.stdin is not None
            seed_proc.stdin.close()
            seed_out = json.loads(read_line(seed_proc, "the seed's result", 30))
            # both sessions close cleanly: exit status 0, nothing on stderr
            exits = {}
            for role, proc in (("seed", seed_proc), ("leech", leech_proc)):
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
                assert proc.stderr is not None
                exits[role] = (proc.returncode, proc.stderr.read()[-3000:])
            with open(f"{d}/leech/blob.bin", "rb") as f:
                ok = hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
            out.append({"marks": got["marks"], "leech": got, "seed": seed_out,
                        "seed_public": seed.public_ip, "leech_public": leech.public_ip,
                        "size": size, "sha256_ok": ok, "exits": exits})
        if progress is not None:
            m = got["marks"]
            progress(f"run {n + 1}/{repeat}: metadata {m['metadata']:.2f} s, first byte "
                     f"{m['first_byte']:.2f} s, finished {m['finished']:.2f} s")
    return out


def format_magnet(runs: list[dict[str, Any]]) -> str:
    """Median and worst of each time over the runs."""
    def stat(key: str) -> str:
        xs = sorted(r["marks"][key] for r in runs)
        return f"{xs[len(xs) // 2]:.2f} s / {xs[-1]:.2f} s"
    size = runs[0]["size"] if runs else 0
    return "\n".join([
        f"magnet across two port-restricted NATs, DHT only, {size} bytes, {len(runs)} runs "
        f"(median / worst, from adding the link):",
        f"  metadata    {stat('metadata')}",
        f"  first byte  {stat('first_byte')}",
        f"  finished    {stat('finished')}",
        f"  data intact in {sum(r['sha256_ok'] for r in runs)} of {len(runs)}"])
