#!/usr/bin/env bash
# ferry-ab: times builds of the kvcodec library side by side in one run (docs/gpu.md, "Timing
# two builds of a kernel side by side"). In the bundle it is bin/ferry-ab; the builds are the
# bundle's own lib/libfykvcodec.so ("head") and each lib/ab/<rev>/libfykvcodec.so that
# FERRY_BUNDLE_AB put there.
#
#   bin/ferry-ab [--rounds N] [--only a,b] -- COMMAND [ARGS...]
#
# Runs COMMAND once per build per round, the builds alternating within each round (GPU timings
# drift by a few per cent over minutes, so a build's rounds are spread over the run). Before
# each run the build is copied over lib/libfykvcodec.so, which every bundled program loads
# through its RPATH (LD_LIBRARY_PATH cannot override that); the bundle's own library is put back
# at the end, also when interrupted. In ARGS, {build} and {round} are replaced by the build's
# name and the round number, e.g. --json "$OUT/codec-{build}-{round}.json". Each run's output
# is printed behind a "== build <name> round <r>" line. Exit status: 1 if any run failed.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
bundle=$(cd "$here/.." && pwd)
lib="$bundle/lib/libfykvcodec.so"
[ -f "$lib" ] || { echo "ferry-ab: run it from an extracted bundle (no $lib)" >&2; exit 2; }

rounds=2
only=''
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --rounds) [ $# -ge 2 ] || { usage >&2; exit 2; }; rounds=$2; shift ;;
    --only) [ $# -ge 2 ] || { usage >&2; exit 2; }; only=$2; shift ;;
    --) shift; break ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ferry-ab: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$rounds" in ''|*[!0-9]*|0) echo "ferry-ab: --rounds takes a positive count" >&2; exit 2 ;; esac
[ $# -gt 0 ] || { echo "ferry-ab: no command (give it after --)" >&2; usage >&2; exit 2; }

# The builds: head first, then lib/ab/* in name order.
saved="$bundle/lib/.libfykvcodec.head.so"
[ -f "$saved" ] || cp -p "$lib" "$saved" || exit 2
names=(head)
files=("$saved")
for f in "$bundle"/lib/ab/*/libfykvcodec.so; do
  [ -f "$f" ] || continue
  names+=("$(basename "$(dirname "$f")")")
  files+=("$f")
done
if [ -n "$only" ]; then
  keep_n=() keep_f=()
  for i in "${!names[@]}"; do
    case ",$only," in *",${names[$i]},"*) keep_n+=("${names[$i]}"); keep_f+=("${files[$i]}") ;; esac
  done
  names=("${keep_n[@]}") files=("${keep_f[@]}")
fi
[ "${#names[@]}" -gt 0 ] || { echo "ferry-ab: no build left to run" >&2; exit 2; }
[ "${#names[@]}" -gt 1 ] || echo "ferry-ab: one build only (${names[0]}): nothing to compare"

# put FILE: FILE becomes lib/libfykvcodec.so (a new file renamed over it, never rewritten in place).
put() { cp -p "$1" "$lib.tmp" && mv -f "$lib.tmp" "$lib"; }
restore() { put "$saved" && rm -f "$saved"; }
trap 'restore; exit 130' INT TERM

status=0
for ((r = 1; r <= rounds; r++)); do
  for i in "${!names[@]}"; do
    put "${files[$i]}" || { status=1; break 2; }
    args=()
    for a in "$@"; do
      a=${a//\{build\}/${names[$i]}}
      args+=("${a//\{round\}/$r}")
    done
    echo "== build ${names[$i]} round $r: ${args[*]}"
    "${args[@]}"
    rc=$?
    [ "$rc" -eq 0 ] || { echo "== build ${names[$i]} round $r: exit $rc"; status=1; }
  done
done
restore
exit "$status"
