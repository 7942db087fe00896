#!/bin/sh
# The model across a GPU node's small transfers: split it into parts that fit beside the
# bundle, carry them in turn (a warm node keeps the ignored files of one call for the next),
# and join them there, checked against the source file's sha256.
#
#   scripts/model-parts.sh split [MODEL [DIR [SIZE]]]
#       MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf) into DIR (default
#       .gpu/model-parts) as part.aa, part.ab, ... of SIZE bytes (default 38M) and SHA256
#   scripts/model-parts.sh join [DIR [MODEL]]
#       DIR's parts, concatenated into MODEL (default models/SmolLM2-135M-Instruct.Q4_1.gguf),
#       kept only when the sha256 matches DIR/SHA256; exit 1 otherwise
#
# docs/gpu.md ("The model on the node") has the sequence of calls.
set -eu
cmd=${1:-}
default_model=models/SmolLM2-135M-Instruct.Q4_1.gguf
case "$cmd" in
split)
  model=${2:-$default_model}
  dir=${3:-.gpu/model-parts}
  size=${4:-38M}
  [ -f "$model" ] || { echo "model-parts: no $model (make setup fetches it)" >&2; exit 1; }
  rm -rf "$dir"
  mkdir -p "$dir"
  sha256sum "$model" | cut -d' ' -f1 > "$dir/SHA256"
  split -b "$size" "$model" "$dir/part."
  echo "model-parts: $(ls "$dir" | grep -c '^part\.') parts of $model in $dir"
  ls -l "$dir"
  ;;
join)
  dir=${2:-.gpu/model-parts}
  model=${3:-$default_model}
  [ -f "$dir/SHA256" ] || { echo "model-parts: no $dir/SHA256" >&2; exit 1; }
  mkdir -p "$(dirname "$model")"
  cat "$dir"/part.* > "$model.part"
  got=$(sha256sum "$model.part" | cut -d' ' -f1)
  if [ "$got" != "$(cat "$dir/SHA256")" ]; then
    rm -f "$model.part"
    echo "model-parts: sha256 $got, want $(cat "$dir/SHA256"): a part is missing or damaged" >&2
    exit 1
  fi
  mv "$model.part" "$model"
  echo "model-parts: $model joined (sha256 verified)"
  ;;
*)
  sed -n '2,13p' "$0" >&2
  exit 2
  ;;
esac
