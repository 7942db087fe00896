#!/usr/bin/env bash
# ferry-gpu-check: runs the GPU tests and benchmarks from the offline bundle (docs/gpu.md).
# In the bundle it is bin/ferry-gpu-check; it finds the bundle root from its own location.
#
#   bin/ferry-gpu-check [--tests-only | --benches-only] [--filter REGEX | --goals]
#                       [--timeout S] [--benches FILE] [--list] [--pack | --no-pack]
#
# --goals: every CUDA test and the benchmarks the GPU goals are measured by (attention against
# SDPA, the Llama-3-8B codec rows, short requests, the model, one layer's kernels under ncu):
# about four minutes on an H200, where the whole list takes far longer.
#
# 1. Prints the machine: GPUs (nvidia-smi: name, driver, memory), CUDA (nvcc or the driver's
#    version), glibc, CPU; and which CUDA libraries the binaries need and where they resolve.
# 2. Runs every tests/test_*_cuda (exit 0 pass, 77 skip, else fail), then the shipped CPU
#    tests (tests/test_*), each under the timeout, with tests/<name>.env added if present.
# 3. Runs every line of bench/gpu-benchmarks.txt ("<name>|<command>", relative to the bundle
#    root) under the timeout (exit 0 pass, 77 skip, else fail).
# Each command's output goes to $FERRY_RESULTS/<name>.log; a summary table ends the run and is
# also written to $FERRY_RESULTS/summary.txt. A failure never stops the run; the exit status is
# 1 when anything failed or timed out, else 0. Without the model (FERRY_MODEL), the CUDA tests
# that load it are skipped, saying so. With --pack (the default when the results go to $OUT
# or a folder in it, from which only a few files come back) the logs and env.txt end up in one
# $FERRY_RESULTS/logs.tar.gz, leaving summary.txt, the archive and the benchmarks' own files.
#
# Environment: FERRY_MODEL (GGUF path, default models/SmolLM2-135M-Instruct.Q4_1.gguf in the
# current directory), FERRY_RESULTS (default $OUT if set, else ./gpu-results),
# FERRY_SOURCE_ROOT (default the current directory), FERRY_CHECK_TIMEOUT (seconds per
# command, default 90), CUDA_HOME.
set -uo pipefail

here=$(cd "$(dirname "$0")" && pwd)
if [ -f "$here/../MANIFEST.txt" ] && [ -d "$here/../tests" ] && [ -d "$here/../bench" ]; then
  bundle=$(cd "$here/.." && pwd)
else
  echo "ferry-gpu-check: run it from an extracted bundle (bin/ferry-gpu-check)" >&2
  exit 2
fi

run_tests=1
run_benches=1
filter=''
timeout_s=${FERRY_CHECK_TIMEOUT:-90}
benches_file="$bundle/bench/gpu-benchmarks.txt"
list_only=0
pack=''
usage() { awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; }
while [ $# -gt 0 ]; do
  case "$1" in
    --tests-only) run_benches=0 ;;
    --benches-only) run_tests=0 ;;
    --filter) [ $# -ge 2 ] || { usage >&2; exit 2; }; filter=$2; shift ;;
    --filter=*) filter=${1#--filter=} ;;
    --goals) filter='^(test_[a-z0-9_]+_cuda|attend-sdpa|attend|codec-gpu-llama3|codec-short|model-smollm2|model-llama3-8b|ncu-codec-32k-ferry)$' ;;
    --timeout) [ $# -ge 2 ] || { usage >&2; exit 2; }; timeout_s=$2; shift ;;
    --timeout=*) timeout_s=${1#--timeout=} ;;
    --benches) [ $# -ge 2 ] || { usage >&2; exit 2; }; benches_file=$2; shift ;;
    --benches=*) benches_file=${1#--benches=} ;;
    --list) list_only=1 ;;
    --pack) pack=1 ;;
    --no-pack) pack=0 ;;
    -h|--help) usage; exit 0 ;;
    *) echo "ferry-gpu-check: unknown option $1" >&2; usage >&2; exit 2 ;;
  esac
  shift
done
case "$timeout_s" in ''|*[!0-9]*) echo "ferry-gpu-check: --timeout takes seconds" >&2; exit 2 ;; esac
benches_file=$(cd "$(dirname "$benches_file")" 2>/dev/null && pwd)/$(basename "$benches_file")

# is_elf FILE: true for an ELF binary or library (no dependency on file(1)).
is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" 2>/dev/null | tail -c 3)" = ELF ]; }

# ---- Environment for every command.
model=${FERRY_MODEL:-models/SmolLM2-135M-Instruct.Q4_1.gguf}
case "$model" in /*) ;; *) model="$(pwd)/$model" ;; esac
export FERRY_MODEL=$model
# Tests that read fixtures or the model from a checkout (tests/model) look under
# FERRY_SOURCE_ROOT: the folder the check was started from, unless set.
FERRY_SOURCE_ROOT=${FERRY_SOURCE_ROOT:-$(pwd)}
export FERRY_SOURCE_ROOT
results=${FERRY_RESULTS:-${OUT:-./gpu-results}}
mkdir -p "$results" || { echo "ferry-gpu-check: cannot create $results" >&2; exit 2; }
FERRY_RESULTS=$(cd "$results" && pwd)
export FERRY_RESULTS
export FERRY_LOG=${FERRY_LOG:-warn}

# CUDA libraries (cudart, cuBLAS, NCCL) come from the node: the toolkit, or the pip wheels
# (nvidia-*-cu12/13: site-packages/nvidia/<pkg>/lib or nvidia/cu13/lib).
cuda_dirs=()
add_dir() { [ -d "$1" ] && cuda_dirs+=("$(cd "$1" && pwd)"); }
[ -n "${CUDA_HOME:-}" ] && add_dir "$CUDA_HOME/lib64"
add_dir /usr/local/cuda/lib64
add_dir /usr/local/cuda/targets/x86_64-linux/lib
for d in /usr/local/cuda-*/lib64; do add_dir "$d"; done
if command -v python3 >/dev/null; then
  while IFS= read -r d; do add_dir "$d"; done < <(timeout 20 python3 - <<'EOF' 2>/dev/null
import os
try:
    import nvidia
    for p in nvidia.__path__:
        for d in sorted(os.listdir(p)):
            lib = os.path.join(p, d, "lib")
            if os.path.isdir(lib):
                print(lib)
except Exception:
    pass
EOF
)
fi
# The bundle's own lib/ is not added: every bundled ELF file finds it through its RPATH,
# and leaving it out keeps it away from other programs a benchmark runs (python3, torch).
ld_path=''
declare -A seen=()
for d in "${cuda_dirs[@]}"; do
  [ -n "${seen[$d]:-}" ] && continue
  seen[$d]=1
  ld_path="${ld_path:+$ld_path:}$d"
done
export LD_LIBRARY_PATH="$ld_path${LD_LIBRARY_PATH:+${ld_path:+:}$LD_LIBRARY_PATH}"

# ---- What to run.
tests=()
if [ "$run_tests" = 1 ]; then
  # CUDA tests first, then the CPU tests that check the bundle itself.
  for f in "$bundle"/tests/test_*_cuda; do [ -x "$f" ] && tests+=("$f"); done
  for f in "$bundle"/tests/test_*; do
    case "$f" in *_cuda|*.env) continue ;; esac
    [ -x "$f" ] && tests+=("$f")
  done
fi
bench_names=()
bench_cmds=()
if [ "$run_benches" = 1 ]; then
  if [ -f "$benches_file" ]; then
    n=0
    while IFS= read -r line || [ -n "$line" ]; do
      n=$((n + 1))
      case "$line" in ''|'#'*) continue ;; esac
      case "$line" in *'|'*) ;; *) echo "ferry-gpu-check: $benches_file:$n: no '|', skipped" >&2; continue ;; esac
      bname=${line%%|*}
      bname=${bname//[[:space:]]/}
      cmd=${line#*|}
      case "$bname" in ''|*[!A-Za-z0-9._-]*)
        echo "ferry-gpu-check: $benches_file:$n: bad name '$bname', skipped" >&2; continue ;; esac
      bench_names+=("$bname")
      bench_cmds+=("$cmd")
    done < "$benches_file"
  else
    echo "ferry-gpu-check: no $benches_file" >&2
  fi
fi
matches() { [ -z "$filter" ] || [[ "$1" =~ $filter ]]; }

if [ "$list_only" = 1 ]; then
  for f in "${tests[@]}"; do matches "$(basename "$f")" && echo "test  $(basename "$f")"; done
  for i in "${!bench_names[@]}"; do
    matches "${bench_names[$i]}" && echo "bench ${bench_names[$i]}|${bench_cmds[$i]}"
  done
  exit 0
fi

# ---- The machine.
{
  echo "== ferry-gpu-check $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(cat /proc/sys/kernel/hostname 2>/dev/null || echo unknown)"
  [ -f "$bundle/MANIFEST.txt" ] && sed -n '2,3p' "$bundle/MANIFEST.txt" | sed 's/^/bundle /'
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=index,name,driver_version,memory.total,compute_cap --format=csv,noheader 2>&1 | sed 's/^/gpu: /'
    nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9.]*\).*/driver CUDA version: \1/p' | head -n1
  else
    echo "gpu: nvidia-smi not found"
  fi
  if command -v nvcc >/dev/null; then
    echo "nvcc: $(nvcc --version | sed -n 's/.*release \([^,]*\),.*/\1/p')"
  elif [ -x /usr/local/cuda/bin/nvcc ]; then
    echo "nvcc: $(/usr/local/cuda/bin/nvcc --version | sed -n 's/.*release \([^,]*\),.*/\1/p')"
  else
    echo "nvcc: not installed (not needed)"
  fi
  echo "glibc: $(getconf GNU_LIBC_VERSION 2>/dev/null || ldd --version 2>&1 | head -n1)"
  echo "cpu: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -n1) ($(nproc) threads)"
  echo "model: $FERRY_MODEL$([ -f "$FERRY_MODEL" ] || echo ' (MISSING)')"
  echo "results: $FERRY_RESULTS"
  echo "LD_LIBRARY_PATH: $LD_LIBRARY_PATH"
  # Every library a binary needs that does not resolve on this node.
  missing=$(for f in "$bundle"/bin/* "$bundle"/tests/*; do
              [ -x "$f" ] && is_elf "$f" || continue
              ldd "$f" 2>/dev/null | awk -v b="$(basename "$f")" '/not found/ {print $1 " (" b ")"}'
            done | sort | awk '{ if ($1 != last) { printf "%s%s", (n++ ? "\n" : ""), $0 } last = $1 }')
  if [ -n "$missing" ]; then
    echo "libraries NOT FOUND (the binaries that need them will fail to start):"
    echo "$missing" | sed 's/^/  /'
  else
    echo "libraries: all resolve"
  fi
  for l in libcudart.so libcublas.so libcublasLt.so libnccl.so; do
    for f in "$bundle"/tests/test_*_cuda "$bundle"/bin/ferry-bench; do
      [ -x "$f" ] || continue
      p=$(ldd "$f" 2>/dev/null | awk -v l="$l" 'index($1, l) == 1 && $3 != "not" {print $1 " => " $3; exit}')
      if [ -n "$p" ]; then echo "  $p"; break; fi
    done
  done
} 2>&1 | tee "$FERRY_RESULTS/env.txt"
gpu_count=0
if command -v nvidia-smi >/dev/null; then
  gpu_count=$(nvidia-smi --query-gpu=index --format=csv,noheader 2>/dev/null | grep -c '^[0-9]')
fi

# ---- Run.
summary=()
n_pass=0 n_fail=0 n_skip=0
now_ms() { date +%s%3N; }

# run_one KIND NAME CMD...: runs under the timeout from the bundle root, logs, records.
run_one() {
  local kind=$1 name=$2
  shift 2
  local log="$FERRY_RESULTS/$name.log" t0 t1 rc secs verdict note=''
  echo "-- $kind $name"
  t0=$(now_ms)
  ( cd "$bundle" && exec timeout -k 5 "$timeout_s" "$@" ) > "$log" 2>&1 < /dev/null
  rc=$?
  t1=$(now_ms)
  secs=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1000 }')
  if [ "$rc" = 0 ]; then
    verdict=pass; n_pass=$((n_pass + 1))
  elif [ "$rc" = 77 ]; then
    verdict=skip; n_skip=$((n_skip + 1))
    # The reason a test gives ("SKIP: ..."), for the summary.
    note=$(grep -m1 -i '^skip' "$log" | sed 's/^[Ss][Kk][Ii][Pp][: ]*//' | cut -c1-60)
    # A CUDA test or a benchmark that skips where nvidia-smi sees GPUs means the runtime could
    # not use them (driver too old for CUDA 13, no device nodes...), unless it says it needs
    # more GPUs than there are (test_nccl_cuda wants two): see its log.
    if [ "$gpu_count" -gt 0 ] && { [ "$kind" = bench ] || [[ "$name" == *_cuda ]]; } &&
       ! grep -qiE 'needs (two|[0-9]+) GPUs' "$log"; then
      verdict='skip (GPU present!)'
    fi
  elif [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    verdict="timeout (${timeout_s}s)"; n_fail=$((n_fail + 1))
  else
    verdict=fail; n_fail=$((n_fail + 1))
  fi
  echo "   $verdict rc=$rc ${secs}s  ($log)"
  if [ "$verdict" != pass ] && [ "$verdict" != skip ]; then tail -n 5 "$log" | sed 's/^/   | /'; fi
  summary+=("$(printf '%-5s %-36s %-22s rc=%-4s %7ss%s' "$kind" "$name" "$verdict" "$rc" "$secs" \
                      "${note:+  $note}")")
}

# The CUDA tests that load the SmolLM2 GGUF (FERRY_MODEL): without it they are skipped here
# (in CI a missing model fails them).
model_tests=' test_model_cuda test_decode_kvc_cuda test_serving_cuda test_worker_cuda test_prefill_cuda '
for f in "${tests[@]}"; do
  name=$(basename "$f")
  matches "$name" || continue
  if [ ! -f "$FERRY_MODEL" ] && [[ "$model_tests" == *" $name "* ]]; then
    echo "-- test $name"
    echo "   skip (no model)"
    n_skip=$((n_skip + 1))
    summary+=("$(printf '%-5s %-36s %-22s rc=%-4s %7ss%s' test "$name" skip - 0.0 \
                        "  no model at $FERRY_MODEL")")
    continue
  fi
  envs=()
  if [ -f "$f.env" ]; then
    while IFS= read -r kv; do
      case "$kv" in ''|'#'*) ;; *=*) envs+=("$kv") ;; esac
    done < "$f.env"
  fi
  run_one test "$name" env "${envs[@]}" "$f"
done
for i in "${!bench_names[@]}"; do
  matches "${bench_names[$i]}" || continue
  run_one bench "${bench_names[$i]}" bash -c "${bench_cmds[$i]}"
done

{
  echo
  echo "== summary ($(date -u +%Y-%m-%dT%H:%M:%SZ), results in $FERRY_RESULTS)"
  for s in "${summary[@]}"; do echo "$s"; done
  echo "$n_pass passed, $n_fail failed, $n_skip skipped"
} > "$FERRY_RESULTS/summary.part"
cat "$FERRY_RESULTS/summary.part"
# The file keeps the machine description too, as the logs may be packed away.
cat "$FERRY_RESULTS/env.txt" "$FERRY_RESULTS/summary.part" > "$FERRY_RESULTS/summary.txt"
rm -f "$FERRY_RESULTS/summary.part"
if [ -z "$pack" ]; then
  pack=0
  if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
    out_dir=$(cd "$OUT" && pwd)
    case "$FERRY_RESULTS/" in "$out_dir"/*) pack=1 ;; esac
  fi
fi
if [ "$pack" = 1 ]; then
  logs=()
  [ -f "$FERRY_RESULTS/env.txt" ] && logs+=(env.txt)
  for s in "${summary[@]}"; do
    n=$(awk '{print $2}' <<<"$s")
    [ -f "$FERRY_RESULTS/$n.log" ] && logs+=("$n.log")
  done
  if tar -C "$FERRY_RESULTS" -czf "$FERRY_RESULTS/logs.tar.gz" "${logs[@]}"; then
    (cd "$FERRY_RESULTS" && rm -f "${logs[@]}")
    echo "logs: $FERRY_RESULTS/logs.tar.gz"
  fi
fi
[ "$n_fail" = 0 ]
