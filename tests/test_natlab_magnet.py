"""A magnet download across two NATs with nothing but a DHT node between
the peers (issue 9): in the NAT lab, a DHT node (``dht serve``) on the
lab's internet, our seed behind one port-restricted NAT, our leecher
behind another, each session told only the DHT node's address.  The seed
announces the torrent; the leecher is given nothing but
``magnet:?xt=urn:btih:...``.  It finds the seed through the DHT, fetches
the info dictionary (ut_metadata) and the data from it, and the seed finds
the leecher the same way.  Neither NAT lets in a packet its host did not
ask for, so the connection exists only because both sides sent toward
each other's public address (each dials the other when the DHT names it,
the torrent redials while it has no peer): a hole punched through both
NATs on the shared uTP port.  Checked: every byte (sha256), the one
connection is uTP to the other's public address, no relay took part.

The times from adding the magnet link to the metadata, to the first byte
and to the last are printed (issue 9's benchmark across two lab NATs).

Needs root (network namespaces, nftables): skips without, fails under
CI=true.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap

import pytest
from testsupport import lab_env, load_natlab, readline_within, unavailable

natlab = load_natlab()

pytestmark = [pytest.mark.slow]

PORT = 40000
DHT_PORT = 6881
SIZE = 4 * 1024 * 1024 + 777
PIECE = 256 * 1024

# One peer: ROLE seed|leech, the torrent (a .torrent path for the seed, a
# magnet link for the leecher), the download dir, our IP, the DHT node's
# HOST:PORT.  The seed prints "ready" once it has announced and its result
# as JSON when stdin closes; the leecher prints its result when done.
PEER = textwrap.dedent("""
    import json, sys, time, trio, bt
    role, what, ddir, ip, dht_at = sys.argv[1:6]
    h, p = dht_at.rsplit(":", 1)
    async def main():
        async with bt.open_session(download_dir=ddir, host=ip, port=%(port)d, tcp=False,
                                   dht=True, dht_bootstrap=[(h, int(p))]) as s:
            t0 = time.monotonic()
            marks = {}
            if role == "seed":
                t = await s.add_torrent(open(what, "rb").read())
                print("ready", flush=True)
                await trio.to_thread.run_sync(sys.stdin.read)
            else:
                t = await s.add_torrent(what)
                with trio.fail_after(120):
                    async with trio.open_nursery() as nursery:
                        async def watch():
                            while True:
                                if "metadata" not in marks and t.has_metadata:
                                    marks["metadata"] = time.monotonic() - t0
                                if "first_byte" not in marks and t.status().downloaded > 0:
                                    marks["first_byte"] = time.monotonic() - t0
                                await trio.sleep(0.01)
                        nursery.start_soon(watch)
                        await t.wait_finished()
                        marks["finished"] = time.monotonic() - t0
                        nursery.cancel_scope.cancel()
            print(json.dumps({
                "marks": marks, "peer_id": s.peer_id.hex(), "session": dict(s.counters),
                "external": list(s.endpoint.external_address or ()),
                "peers": [{"peer_id": x.peer_id.hex(), "addr": list(x.addr),
                           "transport": x.transport} for x in t.peers],
                "transfers": {x.peer_id.hex(): [x.downloaded, x.uploaded]
                              for x in t.status().transfers}}), flush=True)
    trio.run(main)
""") % {"port": PORT}


def test_magnet_across_two_port_restricted_nats_with_only_a_dht_node():
    why = natlab.can_build()
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")
    from bt.create import create_torrent
    from bt.metainfo import parse_metainfo_untrusted

    env = lab_env()
    with natlab.Lab() as lab:
        node = lab.add_host("dht", "none")
        seed = lab.add_host("seed", "restricted")
        leech = lab.add_host("leech", "restricted")
        d = lab.tempdir()
        os.makedirs(f"{d}/seed")
        payload = os.urandom(SIZE)
        with open(f"{d}/seed/blob.bin", "wb") as f:
            f.write(payload)
        data = create_torrent(f"{d}/seed/blob.bin", piece_length=PIECE)
        with open(f"{d}/t.torrent", "wb") as f:
            f.write(data)
        magnet = f"magnet:?xt=urn:btih:{parse_metainfo_untrusted(data).info_hash.hex()}"
        dht_at = f"{node.ip}:{DHT_PORT}"
        procs = []
        try:
            dht = node.popen([sys.executable, "-m", "dht", "serve", "--bind", dht_at],
                             stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, env=env,
                             text=True)
            procs.append(dht)
            seed_proc = seed.popen([sys.executable, "-c", PEER, "seed", f"{d}/t.torrent",
                                    f"{d}/seed", seed.ip, dht_at],
                                   stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True)
            procs.append(seed_proc)
            assert readline_within(seed_proc, "seed", 30) == "ready"
            leech_proc = leech.popen([sys.executable, "-c", PEER, "leech", magnet,
                                      f"{d}/leech", leech.ip, dht_at],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, env=env,
                                     text=True)
            procs.append(leech_proc)
            got = json.loads(readline_within(leech_proc, "leecher's result", 150))
            assert seed_proc.stdin is not None
            seed_proc.stdin.close()
            seed_out = json.loads(readline_within(seed_proc, "seed's result", 30))
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
        with open(f"{d}/leech/blob.bin", "rb") as f:
            assert hashlib.sha256(f.read()).digest() == hashlib.sha256(payload).digest()
    marks = got["marks"]
    print(f"magnet across two NATs, DHT only: metadata {marks['metadata']:.2f} s, first byte "
          f"{marks['first_byte']:.2f} s, finished {marks['finished']:.2f} s "
          f"({SIZE / max(1e-3, marks['finished'] - marks['first_byte']) / 1e6:.1f} MB/s from the "
          f"first byte); leecher {got['session']}")
    # The seed was the leecher's peer, over uTP, at the seed's public
    # address (behind a NAT that drops what its host did not ask for), and
    # brought every byte.  (When both dialed at the same moment, two
    # connections may briefly coexist until the simultaneous-open rule
    # keeps one: the bytes are counted per peer, over all its connections.)
    conns = [p for p in got["peers"] if p["peer_id"] == seed_out["peer_id"]]
    assert conns and all(p["transport"] == "utp" for p in conns), got["peers"]
    assert {p["addr"][0] for p in conns} == {seed.public_ip}, conns
    assert got["transfers"][seed_out["peer_id"]][0] >= SIZE, got["transfers"]
    assert not got["session"].get("connections.tcp") and not seed_out["session"].get("connections.tcp")
    back = [p for p in seed_out["peers"] if p["peer_id"] == got["peer_id"]]
    assert back and {p["addr"][0] for p in back} == {leech.public_ip}, seed_out
    assert seed_out["transfers"][got["peer_id"]][1] >= SIZE, seed_out["transfers"]
