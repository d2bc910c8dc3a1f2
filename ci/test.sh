#!/usr/bin/env bash
# The one command that runs utpkit's whole test suite:  bash ci/test.sh
#
#   1. the C engine with warnings as errors, then the C tests (tests/c)
#   2. the same under AddressSanitizer + UndefinedBehaviorSanitizer
#   3. the libFuzzer drivers (ci/fuzz/run.sh), time-bounded
#   4. the README's quick start, exactly as README.md shows it, in a fresh
#      copy of the tree (what a clone has), from that copy's root
#   5. a wheel, installed into a fresh venv, and pytest run against the
#      installed package, never the source tree
#
# With CI=true a step that cannot run for lack of a tool fails instead of
# being skipped.  Environment knobs:
#   PYTHON           interpreter for the venv (default: python3)
#   UTPKIT_CI_DIR    where the wheel and venv go, emptied first and kept
#                    afterwards (default: a temp dir removed at exit)
#   FUZZ_TIMEOUT     hard limit in seconds for ci/fuzz/run.sh (default 1200)
#   FUZZ_SECONDS     how long each fuzz driver runs (ci/fuzz/run.sh)
#   SKIP_QUICKSTART  1 skips step 4 on a developer machine (an error under CI=true)
#   PYTEST_ARGS      extra arguments for pytest (e.g. "-x -k codec")
#   QUICK            QUICK=1 leaves out the tests marked slow (big transfers,
#                    real peers, the NAT lab's matrices, the 10 s SYN flood):
#                    a developer's quick subset.  CI never sets it.

set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

CI="${CI:-false}"
PYTHON="${PYTHON:-python3}"
SKIPPED=()
RAN=()

step() {
	printf '\n========== %s ==========\n' "$*"
}

# A step that cannot run: fatal under CI, a visible skip elsewhere.
unavailable() {
	if [ "$CI" = "true" ]; then
		echo "ci/test.sh: FAIL: $1 (CI=true, so this is an error; .ci/run installs what is needed)" >&2
		exit 1
	fi
	echo "ci/test.sh: SKIP: $1"
	SKIPPED+=("$2")
}

# The engine build must not pick up a CFLAGS from the environment: the
# Makefile's default is what makes warnings errors.
run_make() {
	env -u CFLAGS make "$@"
}

# ---------------------------------------------------------------------------
step "1/5 C engine: build with -Wall -Wextra -Werror, C tests"
run_make -C utp/core clean
run_make -C utp/core all
run_make -C utp/core check
RAN+=("C build + C tests")

# ---------------------------------------------------------------------------
step "2/5 C engine under ASan + UBSan"
# Probe the toolchain's sanitizer runtime with a program that must run clean.
probe_dir="$(mktemp -d)"
printf 'int main(void) { return 0; }\n' >"$probe_dir/p.c"
if "${CC:-cc}" -fsanitize=address,undefined "$probe_dir/p.c" -o "$probe_dir/p" 2>"$probe_dir/err" &&
	"$probe_dir/p"; then
	rm -rf "$probe_dir"
	export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}"
	export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
	run_make -C utp/core SANITIZE=1 all
	run_make -C utp/core SANITIZE=1 check
	RAN+=("ASan/UBSan C tests")
else
	cat "$probe_dir/err" >&2 || true
	rm -rf "$probe_dir"
	unavailable "${CC:-cc} cannot build or run -fsanitize=address,undefined programs" "sanitizers"
fi

# ---------------------------------------------------------------------------
step "3/5 fuzzing (libFuzzer)"
if [ ! -f ci/fuzz/run.sh ]; then
	echo "ci/test.sh: SKIP: ci/fuzz/run.sh does not exist yet"
	SKIPPED+=("fuzz (no ci/fuzz/run.sh)")
elif ! command -v clang >/dev/null 2>&1; then
	unavailable "clang not found; libFuzzer needs it (apt-get install clang libclang-rt-14-dev)" "fuzz (no clang)"
else
	# run.sh bounds its own run; this limit only guards CI's time budget.
	timeout --kill-after=30 "${FUZZ_TIMEOUT:-1200}" bash ci/fuzz/run.sh
	RAN+=("fuzz")
fi

if [ -n "${UTPKIT_CI_DIR:-}" ]; then
	WORK="$UTPKIT_CI_DIR"
	rm -rf "$WORK"
	mkdir -p "$WORK"
else
	WORK="$(mktemp -d "${TMPDIR:-/tmp}/utpkit-ci.XXXXXX")"
	trap 'rm -rf "$WORK"' EXIT
fi

# ---------------------------------------------------------------------------
step "4/5 README quick start, verbatim, in a fresh copy of the tree"
# The command is read from README.md's first sh block under "## Quick start",
# so the README and this check cannot drift apart.  It runs in a copy holding
# exactly what a clone has (tracked and new unignored files, edits included;
# no .venv, no build output, no compiled module), from the copy's root, the
# directory where the README's `pip install .` must run.
if [ "${SKIP_QUICKSTART:-0}" = "1" ]; then
	unavailable "SKIP_QUICKSTART=1" "quick start"
else
	quickstart="$(awk '
		/^## Quick start/ { insec = 1; next }
		insec && /^## / { exit }
		insec && !inblock && /^```sh[[:space:]]*$/ { inblock = 1; next }
		inblock && /^```/ { exit }
		inblock { print }
	' README.md)"
	if [ -z "$quickstart" ]; then
		echo "ci/test.sh: FAIL: no sh block under '## Quick start' in README.md" >&2
		exit 1
	fi
	fresh="$WORK/fresh-clone"
	mkdir -p "$fresh"
	if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
		git -C "$ROOT" ls-files -z --cached --others --exclude-standard |
			(cd "$ROOT" && xargs -0 sh -c 'for f; do [ -e "$f" ] && printf "%s\0" "$f"; done' sh) |
			tar -C "$ROOT" --null -T - -cf - | tar -C "$fresh" -xf -
	else
		echo "ci/test.sh: FAIL: $ROOT is not a git checkout; cannot make a clone's copy" >&2
		exit 1
	fi
	echo "in $fresh:"
	echo "\$ $quickstart"
	(cd "$fresh" && env -u PYTHONPATH -u VIRTUAL_ENV bash -euo pipefail -c "$quickstart" </dev/null)
	RAN+=("README quick start")
fi

# ---------------------------------------------------------------------------
step "5/5 Python: wheel -> fresh venv -> pytest against the installed package"
VENV="$WORK/venv"
WHEELS="$WORK/wheels"

"$PYTHON" -m venv "$VENV"
# pip's cache (~/.cache/pip) is shared with earlier runs; only the venv is new.
"$VENV/bin/pip" wheel --quiet . -w "$WHEELS" --no-deps
shopt -s nullglob
wheels=("$WHEELS"/utpkit-*.whl)
shopt -u nullglob
if [ "${#wheels[@]}" -ne 1 ]; then
	echo "ci/test.sh: FAIL: expected one utpkit wheel in $WHEELS, found ${#wheels[@]}" >&2
	exit 1
fi
echo "built ${wheels[0]##*/}"
"$VENV/bin/pip" install --quiet "${wheels[0]}[test]"

# Run from the repo root so pytest finds its configuration in pyproject.toml,
# but import only the installed package: the venv's pytest script (unlike
# `python -m pytest`) does not put the working directory on sys.path,
# importlib mode does not insert test directories, and tests/conftest.py
# refuses to run if utp resolves into the source tree.  Nothing is written
# into the tree: no cache, no bytecode, Hypothesis' database in $WORK.
export UTPKIT_REQUIRE_INSTALLED=1
export PYTHONDONTWRITEBYTECODE=1
export HYPOTHESIS_STORAGE_DIRECTORY="$WORK/hypothesis"
set +e
# shellcheck disable=SC2086  # PYTEST_ARGS is a list of words
quick=()
if [ "${QUICK:-0}" = "1" ]; then
	if [ "$CI" = "true" ]; then
		echo "ci/test.sh: FAIL: QUICK=1 under CI=true (CI runs every test)" >&2
		exit 1
	fi
	quick=(-m "not slow")
fi
"$VENV/bin/pytest" -p no:cacheprovider --import-mode=importlib --durations=30 "${quick[@]}" ${PYTEST_ARGS:-}
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
	echo "ci/test.sh: FAIL: pytest collected no tests" >&2
	exit 1
elif [ "$rc" -ne 0 ]; then
	echo "ci/test.sh: FAIL: pytest exited with status $rc" >&2
	exit "$rc"
fi
RAN+=("pytest (installed wheel)")

# ---------------------------------------------------------------------------
step "summary"
summary="ci/test.sh: OK: ran: $(IFS=,; echo "${RAN[*]}" | sed 's/,/, /g')"
if [ "${#SKIPPED[@]}" -gt 0 ]; then
	summary+="; skipped: $(IFS=,; echo "${SKIPPED[*]}" | sed 's/,/, /g')"
fi
echo "$summary"
