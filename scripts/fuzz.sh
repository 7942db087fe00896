#!/usr/bin/env bash
# fuzz.sh: coverage-guided runs of every parser's fuzz target (the `fuzz` test suite) under
# libFuzzer, AddressSanitizer and UndefinedBehaviorSanitizer, each for a fixed time. The test
# suites replay the seed corpora with seeded random mutations; this finds what those miss.
#
#   scripts/fuzz.sh [SECONDS] [BUILD_DIR]      (defaults: 60 seconds a target, build-fuzz)
#
# Each target starts from its seed corpus in tests/ (read only). What it finds that is new
# goes to BUILD_DIR/corpus/<target>/, kept for the next run; a crash, leak or timeout leaves
# its input in BUILD_DIR/crash/<target>/ and fails the target. The last line is
#   N passed, N failed, N skipped
# and the exit status is non-zero if a target failed.
set -uo pipefail
cd "$(dirname "$0")/.."

seconds=${1:-60}
builddir=${2:-build-fuzz}
case "$seconds" in
  '' | *[!0-9]*) echo "fuzz.sh: SECONDS must be a whole number, got '$seconds'" >&2; exit 2 ;;
esac

scripts/setup.sh --no-model || exit 1
if ! command -v clang > /dev/null; then
  echo "fuzz.sh: libFuzzer needs clang (scripts/setup.sh installs it)" >&2
  exit 1
fi

if [ ! -f "$builddir/build.ninja" ]; then
  # The CUDA sources do not take part: the parsers are plain C.
  CC=clang meson setup "$builddir" -Dfuzz=true -Db_sanitize=address,undefined -Db_lundef=false \
    -Dcuda=disabled -Dbuildtype=debug || exit 1
fi

# Regenerate first when meson files changed, so that the test list below is current.
ninja -C "$builddir" build.ninja > /dev/null || exit 1

# The fuzz suite's targets and seed corpora, from the build's own test list: each test's
# command is the target, its run-count argument and the corpus directory.
targets=$(meson introspect "$builddir" --tests | python3 -c '
import json, sys
for t in json.load(sys.stdin):
    if any(s.endswith(":fuzz") or s == "fuzz" for s in t["suite"]):
        print(t["name"], t["cmd"][0], t["cmd"][-1])
') || exit 1
if [ -z "$targets" ]; then
  echo "fuzz.sh: no fuzz targets in $builddir (configured with -Dtests=false?)" >&2
  exit 1
fi

# Only the targets and what they link: the rest of the tree is not needed here.
# Seed corpora the build writes (tests/model's fuzz-gguf) are built too.
ninja_targets=()
build_abs=$(realpath "$builddir")
while read -r _ exe seeds; do
  ninja_targets+=("$(realpath --relative-to="$builddir" "$exe")")
  case "$(realpath -m "$seeds")" in
    "$build_abs"/*) ninja_targets+=("$(realpath -m --relative-to="$builddir" "$seeds")") ;;
  esac
done <<< "$targets"
ninja -C "$builddir" "${ninja_targets[@]}" || exit 1

passed=0
failed=0
while read -r name exe seeds; do
  corpus="$builddir/corpus/$name"
  crash="$builddir/crash/$name"
  mkdir -p "$corpus" "$crash"
  log="$builddir/fuzz-$name.log"
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: one that needs 2 GiB is a
  # memory bomb. Both fail the target like a crash.
  ASAN_OPTIONS=detect_leaks=1:abort_on_error=1 \
    UBSAN_OPTIONS=print_stacktrace=1:halt_on_error=1 \
    "$exe" -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    -artifact_prefix="$crash/" "$corpus" "$seeds" > "$log" 2>&1 < /dev/null
  rc=$?
  runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$log" | grep -o '[0-9]*$')
  edges=$(grep -o 'cov: [0-9]*' "$log" | tail -1 | grep -o '[0-9]*$')
  if [ "$rc" -eq 0 ]; then
    passed=$((passed + 1))
    echo "ok    $name: ${runs:-?} inputs in ${seconds} s, ${edges:-?} edges, corpus $corpus"
  else
    failed=$((failed + 1))
    echo "FAIL  $name (exit $rc): input in $crash/, log $log"
    grep -m 20 -E '^(==[0-9]+==ERROR|SUMMARY|.*runtime error)' "$log" | sed 's/^/      /'
  fi
done <<< "$targets"

echo "$passed passed, $failed failed, 0 skipped"
[ "$failed" -eq 0 ]
