"""A magnet download across two port-restricted NATs with nothing but a
DHT node between the peers (issue 9), as ``python -m ci.natlab magnet``
runs it (ci/natlab/magnet.py says how): the leecher is given nothing but
``magnet:?xt=urn:btih:...``, finds the seed through the DHT, and fetches
the info dictionary and every byte over a uTP connection between the two
NATs' public addresses -- one that exists only because both sides sent
toward each other (a punched hole; neither NAT lets in what its host did
not ask for).  The times to metadata, first byte and finish are printed.

Needs root (network namespaces, nftables): skips without, fails under
CI=true.
"""

from __future__ import annotations

import pytest
from testsupport import load_natlab, unavailable

natlab = load_natlab()

pytestmark = [pytest.mark.slow]


def test_magnet_across_two_port_restricted_nats_with_only_a_dht_node():
    why = natlab.can_build()
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")
    from natlab.magnet import format_magnet, run_magnet

    [run] = run_magnet(4 * 1024 * 1024 + 777)
    print("\n" + format_magnet([run]) + f"\n  leecher counters {run['leech']['session']}")
    got, seed_out, size = run["leech"], run["seed"], run["size"]
    assert run["sha256_ok"]
    # both sessions closed cleanly (a peer hanging up while the session
    # closed once escaped the seed's session as PeerClosed)
    for role, (code, err) in run["exits"].items():
        assert code == 0 and not err.strip(), f"the {role} exited with {code}:\n{err}"
    # The seed was the leecher's peer, over uTP, at the seed's public
    # address, and brought every byte.  (When both dialed at the same
    # moment, two connections may briefly coexist until the
    # simultaneous-open rule keeps one: bytes are counted per peer, over
    # all its connections.)
    conns = [p for p in got["peers"] if p["peer_id"] == seed_out["peer_id"]]
    assert conns and all(p["transport"] == "utp" for p in conns), got["peers"]
    assert {p["addr"][0] for p in conns} == {run["seed_public"]}, conns
    assert got["transfers"][seed_out["peer_id"]][0] >= size, got["transfers"]
    assert not got["session"].get("connections.tcp") and not seed_out["session"].get("connections.tcp")
    back = [p for p in seed_out["peers"] if p["peer_id"] == got["peer_id"]]
    assert back and {p["addr"][0] for p in back} == {run["leech_public"]}, seed_out
    assert seed_out["transfers"][got["peer_id"]][1] >= size, seed_out["transfers"]
    # the metadata came first, then the data
    assert 0 < run["marks"]["metadata"] <= run["marks"]["first_byte"] <= run["marks"]["finished"]
