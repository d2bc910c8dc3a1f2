"""The README stays true: its package list matches .ci/run's, its quick
start is one line that ci/test.sh can run, and the commands it shows exist.

(ci/test.sh itself runs the quick start, verbatim, in a fresh copy of the
tree; tests/test_ucat_shell.py runs the ucat example in a real shell.)
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from testsupport import ROOT, require_no_inplace_extension, unavailable

README = (ROOT / "README.md").read_text()


def _section(title: str) -> str:
    start = README.index(title)
    end = README.find("\n## ", start + len(title))
    return README[start:end if end >= 0 else len(README)]


def _ci_run_packages() -> list[str]:
    text = (ROOT / ".ci" / "run").read_text()
    block = re.search(r"^packages=\((.*?)^\)", text, re.S | re.M)
    assert block, ".ci/run has no packages=( ... ) list"
    words = []
    for line in block.group(1).splitlines():
        line = line.split("#", 1)[0]
        words += line.split()
    return words


def test_system_packages_match_ci_run():
    """Every package .ci/run installs is in the README's list, and the
    README lists nothing .ci/run does not install."""
    listed = set(re.findall(r"`([a-z0-9][a-z0-9.+-]+)`", _section("System packages for the test suite")
                            .split("<a id=\"opentracker\">")[0]))
    installed = set(_ci_run_packages())
    assert installed - listed == set(), f"in .ci/run but not in the README: {sorted(installed - listed)}"
    assert listed - installed == set(), f"in the README but not in .ci/run: {sorted(listed - installed)}"


def _quick_start_block() -> list[str]:
    section = _section("## Quick start")
    block = re.search(r"^```sh\n(.*?)^```", section, re.S | re.M)
    assert block, "no sh block under '## Quick start'"
    return [line for line in block.group(1).splitlines() if line.strip()]


def test_quick_start_is_one_line_and_uses_the_installed_demo():
    lines = _quick_start_block()
    assert len(lines) == 1, lines
    line = lines[0]
    assert line.startswith("python3 -m venv .venv && .venv/bin/pip install . && "), line
    # Not `python -m utp.demo`: run in the clone's root, that imports the
    # source tree, which has no compiled extension (issue 13).
    assert "python -m utp" not in line and line.endswith(".venv/bin/utp-demo"), line
    # The table at the top shows the same command.
    assert f"`{line}`" in README


def test_console_scripts_the_readme_uses_are_installed():
    """utp-demo, utp-bench, ucat, dht, bt: next to the interpreter running the
    tests when utpkit is installed into a venv (as ci/test.sh does)."""
    bindir = Path(sys.executable).parent
    if not (bindir / "ucat").exists():
        unavailable("utpkit's console scripts are not next to this interpreter (not a venv install)")
    for name in ("utp-demo", "utp-bench", "ucat", "dht", "bt"):
        assert f".venv/bin/{name}" in README, name
        out = subprocess.run([str(bindir / name), "--help" if name != "utp-bench" else "help"],
                             capture_output=True, text=True, timeout=60, cwd="/")
        assert out.returncode == 0, (name, out.stderr)


def test_source_checkout_import_explains_itself(tmp_path):
    """`python -m utp.demo` in a checkout without a compiled extension fails
    with a message naming the cause and what to run instead."""
    require_no_inplace_extension()
    out = subprocess.run([sys.executable, "-c", "import utp"], capture_output=True, text=True,
                         timeout=60, cwd=ROOT, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(ROOT)})
    assert out.returncode != 0
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: utp was imported from the source checkout"), last
    assert "no compiled utp._utp" in last and ".venv/bin/utp-demo" in last, last
    assert "pip install -e ." in last, last
    assert shutil.which("true") is not None  # PATH above was usable
