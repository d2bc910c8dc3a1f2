"""The NAT success matrix over real kernel NATs (issue 5): ``ucat
--rendezvous`` through opentracker for every pair of (no NAT, full cone,
port-restricted, symmetric), 4 MiB each way with sha256 equality where
theory allows, a clear error within the deadline where it does not; then
the punchable pairs again with 5% random loss on every router; and the
whole matrix again meeting through the DHT (a ``python -m dht serve`` node
on the lab's internet, ``ucat --bootstrap``) instead of the tracker.

Needs root (network namespaces, nftables) and opentracker (not for the DHT
matrix): skips without them, fails under CI=true.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys

import pytest
from testsupport import ROOT, load_natlab, require_no_inplace_extension, unavailable

natlab = load_natlab()
from natlab.matrix import (by_birthday, format_matrix, later_connect_time,  # noqa: E402
                           offset_totals, punchable, run_matrix)

DEADLINE = 10.0
SIZE = 4 << 20


@pytest.fixture(autouse=True)
def _need_lab(request):
    why = natlab.can_build()
    needs_tracker = "dht" not in request.node.name
    if why is None and needs_tracker and shutil.which("opentracker") is None:
        why = "opentracker is not installed (Debian package opentracker)"
    if why is not None:
        unavailable(why, "CI must run the NAT lab, as root")


def test_theory():
    # Symmetric meets port-restricted NATs only by birthday probing (issue 10).
    assert punchable("symmetric", "restricted") and punchable("restricted", "symmetric")
    assert by_birthday("symmetric", "restricted") and by_birthday("answering", "symmetric")
    assert not by_birthday("symmetric", "full") and not by_birthday("restricted", "restricted")
    assert not punchable("symmetric", "symmetric")
    assert punchable("symmetric", "full") and punchable("none", "symmetric")
    assert punchable("restricted", "restricted")


def test_matrix(capsys):
    progress: list[str] = []
    results = run_matrix(natlab.NAT_KINDS, size=SIZE, deadline=DEADLINE, progress=progress.append)
    # A line as the lab is built, one as the pairs start, one per pair as it ends.
    assert len(progress) == 2 + 16, progress
    for r in results:
        assert any(f"/16 {r.a} -> {r.b}: " in line for line in progress), (r.a, r.b, progress)
    text = format_matrix(results, size=SIZE, loss=0, deadline=DEADLINE)
    with capsys.disabled():
        print("\n" + text)
    assert len(results) == 16
    for r in results:
        if punchable(r.a, r.b):
            assert r.ok, f"{r.a} -> {r.b} should connect: {r.error}"
            assert r.connect_time is not None and r.connect_time < DEADLINE
            # Birthday probing exactly where a symmetric NAT faces a
            # port-restricted one, and the ucats say which probe met.
            assert (r.probes is not None) == by_birthday(r.a, r.b), (r.a, r.b, r.probes)
        else:
            assert not r.ok
            # A clear error, on both sides, within the deadline.
            assert r.error.count("hole punching to") == 2, r.error
            assert "timed out" in r.error
            assert r.elapsed < DEADLINE + 5


def test_punchable_pairs_with_5_percent_loss(capsys):
    pairs = [(a, b) for a in natlab.NAT_KINDS for b in natlab.NAT_KINDS if punchable(a, b)]
    results = run_matrix(natlab.NAT_KINDS, loss=5, size=SIZE, deadline=20.0, pairs=pairs)
    with capsys.disabled():
        print("\n" + format_matrix(results, size=SIZE, loss=5, deadline=20.0))
    # Every pair but symmetric <-> symmetric (with birthday probing, issue 10).
    assert len(results) == 15
    # Every pair connects and moves every byte both ways.
    failed = [f"{r.a} -> {r.b}: {r.error}" for r in results if not r.delivered]
    assert not failed, "\n".join(failed)
    # And every ucat exits 0: a side that leaves right after the close
    # stays (TIME_WAIT, about two RTOs) to ACK a FIN resent because its
    # last ACK was lost, so the peer never sees a reset after the data.
    unclean = [f"{r.a} -> {r.b}: {r.error}" for r in results if not r.ok]
    assert not unclean, "\n".join(unclean)


def test_matrix_through_the_dht(capsys):
    results = run_matrix(natlab.NAT_KINDS, size=SIZE, deadline=DEADLINE, via="dht")
    text = format_matrix(results, size=SIZE, loss=0, deadline=DEADLINE, via="dht")
    with capsys.disabled():
        print("\n" + text)
    assert len(results) == 16
    for r in results:
        if punchable(r.a, r.b):
            assert r.ok, f"{r.a} -> {r.b} should connect through the DHT: {r.error}"
            assert r.connect_time is not None and r.connect_time < DEADLINE
        else:
            assert not r.ok
            assert r.error.count("hole punching to") == 2, r.error
            assert "timed out" in r.error
            assert r.elapsed < DEADLINE + 5


# A bounded part of the sweep (every pair at -3, -1, 0, +1, +3 s
# through both rendezvous kinds; `python -m ci.natlab matrix --kinds all
# --offsets=-3,-1,0,1,3 --via tracker|dht` runs all of it, README "The NAT
# lab"): one pair of each kind the other lab tests do not already run at an
# offset, the two extreme offsets, and symmetric <-> symmetric once.
_OFFSET_PAIRS = [("double", "restricted"), ("double", "double"), ("hairpin", "hairpin"),
                 ("full", "symmetric"), ("none", "answering")]


@pytest.mark.slow
@pytest.mark.parametrize("via", ["tracker", "dht"])
def test_matrix_at_start_offsets(via, capsys):
    pairs = [*_OFFSET_PAIRS, ("symmetric", "symmetric")]
    kinds = [k for k in natlab.ALL_NAT_KINDS if any(k in p for p in pairs)]
    results = run_matrix(kinds, size=1 << 20, deadline=DEADLINE, via=via, pairs=pairs,
                         offsets=(-3.0, 3.0), parallel=4)
    with capsys.disabled():
        print("\n" + format_matrix(results, size=1 << 20, loss=0, deadline=DEADLINE, via=via,
                                   offset=None))
    assert sorted((r.a, r.b, r.offset) for r in results) == sorted(
        (a, b, o) for a, b in pairs for o in (-3.0, 3.0))
    failed = [f"{r.a} -> {r.b} at {r.offset:+g} s: {r.error}" for r in results
              if punchable(r.a, r.b) and not r.ok]
    assert not failed, "\n".join(failed)
    for r in results:
        if not punchable(r.a, r.b):
            assert not r.connected and r.error.count("hole punching to") == 2, r.error
            assert r.elapsed < DEADLINE + abs(r.offset) + 5
        else:
            # What the later starter waits, at most the deadline.
            t = later_connect_time(r)
            assert t is not None and t < DEADLINE, (r.a, r.b, r.offset, t)
    totals = {t["offset"]: t for t in offset_totals(results)}
    assert set(totals) == {-3.0, 3.0}
    assert all(t["punchable_connected"] == t["punchable"] == len(_OFFSET_PAIRS)
               for t in totals.values())


def test_cli_from_the_checkout_root_uses_the_installed_utpkit():
    """`python -m ci.natlab matrix` where the README runs it, the clone's
    root (whose utp/ has no compiled module): the lab's ucats use the
    installed utpkit (issue 13: they failed with "cannot load the uTP
    library"), and progress comes as each pair ends."""
    require_no_inplace_extension()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    out = subprocess.run([sys.executable, "-m", "ci.natlab", "matrix", "--kinds", "none",
                          "--size", "100000"], capture_output=True, text=True, timeout=120,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "cannot load" not in out.stdout + out.stderr
    assert re.search(r"\] +1/1 none -> none: connected in [0-9.]+ s", out.stderr), out.stderr
    assert "1 of 1 pairs connected; all as theory says" in out.stdout
