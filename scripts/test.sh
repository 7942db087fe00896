#!/usr/bin/env bash
# test.sh: set up, build and run every test suite; the last line is
#   N passed, N failed, N skipped
# and the exit status is non-zero if anything failed.
#
#   scripts/test.sh [BUILD_DIR] [meson test args...]
# Environment: FERRY_MESON_ARGS adds options to `meson setup` (e.g. -Db_sanitize=address).
set -uo pipefail
cd "$(dirname "$0")/.."

builddir=${1:-build}
shift || true

scripts/setup.sh || exit 1

if [ ! -f "$builddir/build.ninja" ]; then
  # shellcheck disable=SC2086
  meson setup "$builddir" ${FERRY_MESON_ARGS:-} || exit 1
fi
ninja -C "$builddir" || exit 1

jobs=${FERRY_TEST_JOBS:-$(nproc)}
meson test -C "$builddir" --print-errorlogs --num-processes "$jobs" "$@"
rc=$?

python3 - "$builddir/meson-logs/testlog.json" <<'PY'
import json, sys
passed = failed = skipped = 0
try:
    with open(sys.argv[1]) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            r = json.loads(line).get("result", "")
            if r in ("OK", "EXPECTEDFAIL"):
                passed += 1
            elif r == "SKIP":
                skipped += 1
            else:
                failed += 1
except FileNotFoundError:
    failed = 1
print(f"{passed} passed, {failed} failed, {skipped} skipped")
PY
exit $rc
