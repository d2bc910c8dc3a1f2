"""Helpers shared by several test files.

Tests run with ``--import-mode=importlib`` against the installed wheel, so
they cannot import each other; tests/conftest.py registers this file as the
module ``testsupport`` before any test module is imported.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest
import trio

ROOT = Path(__file__).resolve().parent.parent


def unavailable(reason: str, fix: str = ".ci/run installs what the tests need") -> None:
    """A capability this test needs is missing (a tool, a package, root,
    network namespaces).  Skip with `reason` on a developer machine; under
    CI=true a missing capability is a broken machine, so fail instead."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason} (CI=true: {fix})")
    pytest.skip(reason)


def console_script(name: str) -> Path:
    """The `name` entry point of an installed utpkit, next to the running
    interpreter or on PATH; skips the test in a plain checkout, where no
    console script exists (ci/test.sh always installs the wheel)."""
    script = Path(sys.executable).with_name(name)
    if script.exists():
        return script
    found = shutil.which(name)
    if found is None:
        pytest.skip(f"utpkit is not installed: no {name} console script")
    return Path(found)


def load_natlab() -> ModuleType:
    """ci/natlab from the checkout, as the module ``natlab`` (it is a tool,
    not part of the wheel)."""
    if "natlab" in sys.modules:
        return sys.modules["natlab"]
    where = ROOT / "ci" / "natlab"
    spec = importlib.util.spec_from_file_location("natlab", where / "__init__.py",
                                                  submodule_search_locations=[str(where)])
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["natlab"] = module
    spec.loader.exec_module(module)
    return module


async def exchange(sa, sb, size: int = 100_000) -> None:
    """Send `size` bytes and EOF from sa to sb; check they all arrived."""
    data = bytes(range(256)) * (size // 256)
    got = bytearray()

    async def send():
        await sa.send_all(data)
        await sa.send_eof()

    async def recv():
        while True:
            chunk = await sb.receive_some()
            if not chunk:
                break
            got.extend(chunk)

    async with trio.open_nursery() as n:
        n.start_soon(send)
        n.start_soon(recv)
    assert hashlib.sha256(got).digest() == hashlib.sha256(data).digest()


async def clog(stream, *, quiet: float = 1.0) -> None:
    """Fill `stream` until send_all blocks, then cancel that send_all (as
    trio's own socket tests build their clogged streams).  "Blocks" means no
    progress for `quiet` seconds (real or virtual time), so packets still in
    flight have filled the peer's receive window by then."""
    chunk = b"x" * 65536
    while True:
        with trio.move_on_after(quiet) as scope:
            await stream.send_all(chunk)
        if scope.cancelled_caught:
            return


def clogged(maker, *, quiet: float = 1.0):
    """A clogged-stream maker for trio.testing.check_*_stream from a maker
    of connected (a, b) pairs: both directions are clogged (see clog)."""
    async def make():
        a, b = await maker()
        await clog(a, quiet=quiet)
        await clog(b, quiet=quiet)
        return a, b
    return make
