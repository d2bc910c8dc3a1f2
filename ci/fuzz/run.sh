#!/usr/bin/env bash
# Build the libFuzzer drivers and fuzz the engine for a bounded time.
#
#   bash ci/fuzz/run.sh
#
# Exits non-zero on any crash, sanitizer report, leak, timeout or
# out-of-memory.  Knobs:
#   FUZZ_SECONDS   how long to fuzz (default 120); the seed corpus is always
#                  replayed first
#   FUZZ_WORKDIR   where the corpus grows between runs and artifacts land
#                  (default ci/fuzz/corpus-run, ignored by git)
#   CLANG          compiler (default clang)
#
# A crash leaves its input in $FUZZ_WORKDIR/artifacts/; replay it with
#   ci/fuzz/build/fuzz_process_udp <file>
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
SECONDS_TO_FUZZ="${FUZZ_SECONDS:-120}"
WORK="${FUZZ_WORKDIR:-$HERE/corpus-run}"
PYTHON="${PYTHON:-python3}"

if ! command -v "${CLANG:-clang}" >/dev/null 2>&1; then
	echo "ci/fuzz/run.sh: ${CLANG:-clang} not found (apt-get install clang libclang-rt-14-dev)" >&2
	exit 1
fi

make -C "$HERE" >/dev/null

mkdir -p "$WORK/corpus" "$WORK/seeds" "$WORK/artifacts"
"$PYTHON" "$HERE/seeds.py" "$WORK/seeds"

export ASAN_OPTIONS="${ASAN_OPTIONS:-abort_on_error=1:detect_leaks=1:strict_string_checks=1}"
export UBSAN_OPTIONS="${UBSAN_OPTIONS:-print_stacktrace=1:halt_on_error=1}"
# abort_on_error makes a sanitizer report a crash libFuzzer records; keep
# the core dumps out of the tree.
ulimit -c 0

status=0
for fuzzer in "$HERE"/build/fuzz_*; do
	[ -x "$fuzzer" ] || continue
	name="$(basename "$fuzzer")"
	echo "ci/fuzz/run.sh: $name for ${SECONDS_TO_FUZZ}s (corpus $WORK/corpus/$name)"
	mkdir -p "$WORK/corpus/$name"
	# -timeout: one input taking longer than 10 s is a hang.
	# -rss_limit_mb: the engine must stay small whatever it is fed.
	if ! (cd "$ROOT" && "$fuzzer" \
		-max_total_time="$SECONDS_TO_FUZZ" \
		-timeout=10 \
		-rss_limit_mb=2048 \
		-max_len=4096 \
		-print_final_stats=1 \
		-artifact_prefix="$WORK/artifacts/$name-" \
		"$WORK/corpus/$name" "$WORK/seeds"); then
		echo "ci/fuzz/run.sh: FAIL: $name found a problem; inputs in $WORK/artifacts/" >&2
		ls -l "$WORK/artifacts/" >&2 || true
		status=1
	fi
done
exit "$status"
