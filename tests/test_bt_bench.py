"""``python -m bt.bench`` runs: its help, and a tiny run (4 MiB) that
completes every pairing and prints each row with figures and both target
ratios.  The figures themselves are not judged (a benchmark asserts
nothing; the speed targets are in its output)."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest

from bt.bench import RUNS
from testsupport import require_libtorrent

def _bench(tmp_path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    # from tmp_path: the source tree must not shadow the installed package
    return subprocess.run([sys.executable, "-m", "bt.bench", *args], cwd=tmp_path,
                          capture_output=True, text=True, timeout=timeout)


def test_help_names_the_options(tmp_path):
    got = _bench(tmp_path, "--help", timeout=60)
    assert got.returncode == 0, got.stderr
    for option in ("--quick", "--only", "--profile", "--mse", "--repeat"):
        assert option in got.stdout
    assert "--size-mib" not in got.stdout and "--worker" not in got.stdout   # hidden


@pytest.mark.interop            # about 10 s: six pairings of 4 MiB, libtorrent in four
def test_tiny_run_prints_every_row_and_both_ratios(tmp_path):
    require_libtorrent()
    got = _bench(tmp_path, "--size-mib", "4", "--dir", str(tmp_path), timeout=300)
    assert got.returncode == 0, (got.stdout, got.stderr)
    lines = got.stdout.splitlines()
    number = r"\d+\.\d+"
    for run in RUNS:
        rows = [ln for ln in lines if ln.startswith(run.name + " ") and " vs " not in ln]
        assert len(rows) == 1, (run.name, got.stdout)
        # name, via, then seconds, MB/s, two CPU and two RSS figures
        fields = rows[0].split()
        assert len(fields) == 8 and fields[1] == run.transport, rows[0]
        assert all(re.fullmatch(number, f) for f in fields[2:8]), rows[0]
        assert float(fields[3]) > 0, rows[0]
    assert any(ln.startswith("ours<-lt/utp vs lt<-lt/utp: ") and "target >= 2x" in ln
               for ln in lines), got.stdout
    assert any(ln.startswith("ours<-ours/utp vs ours<-ours/tcp: ") and "target >= 80%" in ln
               for ln in lines), got.stdout
    # our uTP side's counters, for each of our processes on uTP
    for name, side in (("ours<-lt/utp", "leech"), ("ours<-ours/utp", "leech"),
                       ("ours<-ours/utp", "seed")):
        assert any(ln.startswith(f"  {name} {side}: ") and "retransmits" in ln
                   for ln in lines), got.stdout
    # the work directory is removed afterwards
    assert not any(p.name.startswith("bt-bench-") for p in tmp_path.iterdir())


def test_tiny_mse_run_prints_plain_rc4_and_the_ratio(tmp_path):
    """``--mse``: four runs of our peers over uTP, two of them with RC4 (the
    leecher's row says what MSE selected), the means and the ratio."""
    got = _bench(tmp_path, "--mse", "--size-mib", "4", "--dir", str(tmp_path), timeout=300)
    assert got.returncode == 0, (got.stdout, got.stderr)
    lines = got.stdout.splitlines()
    plain = [ln.split() for ln in lines if ln.startswith("ours<-ours/utp ")]
    rc4 = [ln.split() for ln in lines if ln.startswith("ours<-ours/utp+rc4 ")]
    assert len(plain) == len(rc4) == 2, got.stdout
    assert {row[1] for row in plain} == {"-"} and {row[1] for row in rc4} == {"rc4"}
    assert all(float(row[3]) > 0 for row in plain + rc4)
    assert any(re.fullmatch(r"mean over uTP: plain \d+\.\d MB/s, rc4 \d+\.\d MB/s", ln)
               for ln in lines), got.stdout
    assert any(ln.startswith("rc4 vs plain over uTP: ") and "target >= 90%" in ln
               for ln in lines), got.stdout
