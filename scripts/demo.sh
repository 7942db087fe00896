#!/usr/bin/env bash
# demo.sh: the README's demo command. It sets up, builds, and runs the most complete path
# Ferry has today, saying plainly what that is.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build

model=models/SmolLM2-135M-Instruct.Q4_1.gguf
echo
echo "== Ferry demo =="
echo "The serving path (router, prefill and decode workers) is not built yet."
echo "What runs today: the foundation library checks (status codes, fp16/bf16, CRC32C,"
echo "thread pool, arena) and the verified default model file:"
ls -l "$model"
meson test -C build --suite common --print-errorlogs
