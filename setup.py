"""Build the compiled part of utpkit: the extension module ``utp._utp``.

Project metadata lives in pyproject.toml.  This file exists only because the
extension's source list is computed: the Cython binding plus every C file of
the engine in utp/core/, so a new engine module needs no edit here.

Paths are relative to this file's directory, which is where pip and
setuptools run it from.
"""

import glob
import os
import sys

from setuptools import Extension, setup

PYX = "utp/_utp.pyx"
CORE = "utp/core"


def _extensions():
    if not os.path.exists(PYX):
        sys.exit(f"setup.py: {PYX} is missing; the binding is needed to build utpkit")
    from Cython.Build import cythonize

    ext = Extension(
        "utp._utp",
        # Sorted so the link order, and so the build, is reproducible.
        sources=[PYX, *sorted(glob.glob(f"{CORE}/*.c"))],
        include_dirs=[CORE],
        # The engine needs the GNU socket definitions.  Python.h defines
        # _GNU_SOURCE to the same value, so the two never conflict.
        define_macros=[("_GNU_SOURCE", None)],
        # These flags also reach the C file Cython generates, so: no -Werror
        # (Cython output may warn), and gnu99 where the engine itself is
        # strict c99.  `make -C utp/core` in ci/test.sh builds the engine
        # alone with -std=c99 -Wall -Wextra -Werror.
        extra_compile_args=["-std=gnu99", "-O2"],
        depends=sorted(glob.glob(f"{CORE}/*.h")),
    )
    return cythonize([ext], language_level=3, include_path=[CORE])


setup(ext_modules=_extensions())
