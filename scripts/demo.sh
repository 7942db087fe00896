#!/usr/bin/env bash
# demo.sh: the README's demo command. It sets up, builds, and runs the most complete path
# Ferry has today, saying plainly what that is.
set -euo pipefail
cd "$(dirname "$0")/.."

scripts/setup.sh
[ -f build/build.ninja ] || meson setup build
ninja -C build

model=models/SmolLM2-135M-Instruct.Q4_1.gguf
prompts=(
  "What is the capital of France?"
  "Write a haiku about a ferry crossing a river at dawn."
  "Explain in two sentences why a compressed KV cache helps when the network is slow."
)

echo
echo "== Ferry demo =="
echo "The disaggregated serving path (router -> prefill -> UCX -> decode) is not wired up yet."
echo "This demo runs the real model in-process with 'ferry generate --local' (the same model"
echo "runtime the workers will use) on $(basename "$model"), greedy decoding."
for p in "${prompts[@]}"; do
  echo
  echo ">>> $p"
  ./build/client/ferry generate --local --model "$model" --chat --temperature 0 \
    --max-tokens 96 --stats "$p"
  echo
done
