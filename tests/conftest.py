"""Shared pytest configuration for utpkit's tests.

Sections, in order: the installed-package guard (below), then fixtures.
Add new fixtures at the end of the file, each with a docstring.
"""

import importlib
import importlib.util
import os
from pathlib import Path

import pytest

SOURCE_ROOT = Path(__file__).resolve().parent.parent

# Helpers shared by test files (see tests/testsupport.py): registered here
# because --import-mode=importlib lets test files import no sibling module.
_spec = importlib.util.spec_from_file_location("testsupport", Path(__file__).with_name("testsupport.py"))
testsupport = importlib.util.module_from_spec(_spec)
import sys as _sys  # noqa: E402
_sys.modules["testsupport"] = testsupport
_spec.loader.exec_module(testsupport)


# --- installed-package guard ------------------------------------------------
#
# ci/test.sh tests the wheel, not the checkout: it installs the wheel into a
# fresh venv and sets UTPKIT_REQUIRE_INSTALLED=1.  If `utp` were then imported
# from the source tree, a wheel that lacks its compiled module or its stubs
# would pass unnoticed, so refuse to run instead.


def _installed_problems():
    problems = []
    for name in ("_utpkit", "utp", "utp._utp", "dht", "bt", "ucat", "tracker"):
        try:
            module = importlib.import_module(name)
        except ImportError as exc:
            problems.append(f"cannot import {name}: {exc!r}")
            continue
        if getattr(module, "__file__", None) is None:
            problems.append(f"{name} has no file (a namespace package?): {module!r}")
            continue
        origin = Path(module.__file__).resolve()
        if origin.is_relative_to(SOURCE_ROOT):
            problems.append(f"{name} is imported from the source tree: {origin}")
    if problems:
        return problems
    package = Path(importlib.util.find_spec("utp").origin).parent
    for data in ("py.typed", "_utp.pyi"):
        if not (package / data).is_file():
            problems.append(f"the installed package lacks utp/{data} (looked in {package})")
    return problems


def pytest_sessionstart(session):
    if os.environ.get("UTPKIT_REQUIRE_INSTALLED") != "1":
        return
    problems = _installed_problems()
    if problems:
        pytest.exit(
            "UTPKIT_REQUIRE_INSTALLED=1 but the installed utpkit is not usable:\n  "
            + "\n  ".join(problems)
            + "\nBuild and install the wheel (bash ci/test.sh does), and run the "
            "venv's pytest with --import-mode=importlib.",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


# --- fixtures ---------------------------------------------------------------
