#!/usr/bin/env bash
# setup.sh: install what Ferry needs on a fresh Debian/Ubuntu machine and fetch the default
# model. Safe to re-run: it only installs what is missing and skips a verified model.
#
#   scripts/setup.sh            packages + default model
#   scripts/setup.sh --no-model packages only
#
# As root it runs apt-get itself; otherwise it prints the exact command to run.
set -euo pipefail
cd "$(dirname "$0")/.."

want_model=1
for a in "$@"; do
  case "$a" in
    --no-model) want_model=0 ;;
    -h|--help) sed -n '2,9p' "$0"; exit 0 ;;
    *) echo "setup.sh: unknown option $a" >&2; exit 2 ;;
  esac
done

# Build tools and the libraries found by pkg-config in meson.build, plus test/bench helpers.
packages=(
  build-essential pkg-config meson ninja-build clang lld
  libucx-dev ucx-utils libuv1-dev libprotobuf-c-dev protobuf-c-compiler libnghttp2-dev
  libssl-dev openssl
  libopenblas-dev libcmocka-dev libyaml-dev libcjson-dev libhttp-parser-dev
  python3 python3-pip python3-venv iproute2 procps patchelf
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

if [ ${#missing[@]} -gt 0 ]; then
  cmd="apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends ${missing[*]}"
  if [ "$(id -u)" = 0 ]; then
    echo "setup: installing ${missing[*]}"
    apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
  else
    echo "setup: missing packages: ${missing[*]}" >&2
    echo "setup: run as root:  sudo sh -c '$cmd'" >&2
    exit 1
  fi
else
  echo "setup: all packages present"
fi

# Python packages for tests and reference scripts live in a project virtualenv (.venv),
# never in the system interpreter.
if [ -s scripts/requirements-test.txt ] && grep -qv '^\s*#' scripts/requirements-test.txt; then
  if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
  fi
  stamp=.venv/.requirements-test.sha256
  want=$(sha256sum scripts/requirements-test.txt | cut -d' ' -f1)
  if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    echo "setup: installing Python test requirements into .venv"
    .venv/bin/pip install -q --disable-pip-version-check -r scripts/requirements-test.txt
    echo "$want" > "$stamp"
  fi
fi

if [ $want_model = 1 ]; then
  scripts/fetch-model.sh
fi
