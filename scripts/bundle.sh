#!/usr/bin/env bash
# bundle.sh: builds the offline GPU bundle, dist/ferry-bundle/ and dist/ferry-bundle.tar.gz
# (and .tar.xz when xz is installed):
# a release build with CUDA, its binaries, every CUDA test, a few CPU tests that prove the
# bundle runs, the shared libraries a GPU node may lack, bench/gpu-benchmarks.txt and the GPU
# check (bin/ferry-gpu-check). Relocatable: every ELF file gets RPATH $ORIGIN/../lib. See
# docs/gpu.md.
#
#   scripts/bundle.sh            (make bundle)
#
# Environment: FERRY_BUNDLE_BUILD (build folder, default build-bundle), FERRY_BUNDLE_DIST
# (default dist), FERRY_BUNDLE_MAX_MIB (size limit, default 60), FERRY_JOBS (ninja -j, 2),
# FERRY_BUNDLE_AB (git revisions, space-separated: lib/libfykvcodec.so built at each of them
# too, as lib/ab/<rev>/, for bin/ferry-ab to time against this build; their kvcodec and common
# headers must equal this tree's).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

build=${FERRY_BUNDLE_BUILD:-build-bundle}
dist=${FERRY_BUNDLE_DIST:-dist}
max_mib=${FERRY_BUNDLE_MAX_MIB:-60}
jobs=${FERRY_JOBS:-2}
name=ferry-bundle
out="$dist/$name"

die() { echo "bundle: $*" >&2; exit 1; }

# is_elf FILE: true for an ELF binary or library (no dependency on file(1)).
is_elf() { [ -f "$1" ] && [ "$(head -c 4 "$1" 2>/dev/null | tail -c 3)" = ELF ]; }

for tool in meson ninja patchelf strip ldd tar; do
  command -v "$tool" >/dev/null || die "$tool is missing (patchelf: apt-get install patchelf)"
done

# CPU tests shipped with the bundle: each exercises bundled libraries (OpenBLAS, UCX and its
# transport modules, libuv + nghttp2 + protobuf-c) so that a passing run proves lib/ works.
cpu_tests=(test_crc32c test_half test_kernels test_kvc_quant test_rpc_loopback
           test_kvlink_wire test_kvlink_loopback)
# Environment for a shipped test (tests/<name>.env, KEY=VALUE lines; see gpu-check.sh).
declare -A test_env=(
  [test_kvlink_loopback]=$'UCX_TLS=tcp\nUCX_NET_DEVICES=lo'
)
# Daemons and tools, shipped when built.
programs=(ferry ferry-bench ferry-router ferry-prefill ferry-decode)

# ---- Build: its own folder, release, CUDA required. Reconfigure so that new bench_*.c and
# test_*_cuda sources are picked up. Every binary that links CUDA code carries its fatbin
# (sm_80 + sm_90 + compute_90 PTX); --compress-mode=size makes those about 4x smaller
# (kvcodec/attend.cu: 1.7 MB -> 0.38 MB), decompressed once when a program loads them.
# shared_core: common and kvcodec as shared libraries (lib/libfycommon.so, lib/libfykvcodec.so),
# so the kvcodec's device code is in the bundle once, not once per program (about 1.2 MB each).
setup_args=(-Dbuildtype=release -Dcuda=enabled -Dtests=true -Dshared_core=true)
if [ -f "$build/build.ninja" ]; then
  meson setup --reconfigure "$build" "${setup_args[@]}" >/dev/null
else
  meson setup "$build" "${setup_args[@]}" >/dev/null
fi
# cuda_args only exists once the project has added CUDA, and meson 1.0 ignores it on the
# setup command line then; meson configure sets it.
meson configure "$build" -Dcuda_args=--compress-mode=size
ninja -C "$build" -j"$jobs"

# ---- Stage.
rm -rf "$out" "$dist/$name.tar.gz" "$dist/$name.tar.xz"
mkdir -p "$out"/{bin,tests,lib/ucx,bench,scripts}

find_exe() { find "$build" -type f -perm -u+x -name "$1" -not -path '*.p/*' | sort | head -n1; }

for p in "${programs[@]}"; do
  f=$(find_exe "$p")
  if [ -n "$f" ]; then cp "$f" "$out/bin/"; else echo "bundle: $p not built (skipped)"; fi
done
[ -f "$out/bin/ferry-bench" ] || die "ferry-bench was not built"
# ucx_perftest (Debian ucx-utils): `ferry-bench net` measures kvlink against it on the node.
if command -v ucx_perftest >/dev/null; then
  cp "$(command -v ucx_perftest)" "$out/bin/"
else
  echo "bundle: ucx_perftest not found (apt-get install ucx-utils); ferry-bench net will run without it"
fi

n_cuda=0
while IFS= read -r f; do
  [ -n "$f" ] || continue
  base=$(basename "$f")
  [ -e "$out/tests/$base" ] && die "two CUDA tests are named $base"
  cp "$f" "$out/tests/"
  n_cuda=$((n_cuda + 1))
done < <(find "$build/tests" -type f -perm -u+x -name 'test_*_cuda' -not -path '*.p/*' | sort)
[ "$n_cuda" -gt 0 ] || die "no test_*_cuda built: is CUDA (nvcc) available?"

for t in "${cpu_tests[@]}"; do
  f=$(find_exe "$t")
  [ -n "$f" ] || die "CPU test $t was not built"
  cp "$f" "$out/tests/"
done
for t in "${!test_env[@]}"; do
  printf '%s\n' "${test_env[$t]}" > "$out/tests/$t.env"
done

cp scripts/gpu-check.sh "$out/bin/ferry-gpu-check"
cp scripts/ab.sh "$out/bin/ferry-ab"
cp scripts/gpu-check.sh "$out/scripts/gpu-check.sh"
cp scripts/model-parts.sh "$out/scripts/model-parts.sh"
cp scripts/bundle.sh "$out/scripts/bundle.sh"
cp bench/gpu-benchmarks.txt "$out/bench/gpu-benchmarks.txt"
# Files of the source tree that a benchmark line names (bench/attend_sdpa.py...), so the
# commands find them relative to the bundle root as they would in a checkout.
while IFS= read -r f; do
  [ -f "$f" ] || die "bench/gpu-benchmarks.txt names $f, which does not exist"
  mkdir -p "$out/$(dirname "$f")"
  cp "$f" "$out/$f"
done < <(grep -v '^[[:space:]]*#' bench/gpu-benchmarks.txt | cut -s -d'|' -f2- |
         grep -oE '(^|[[:space:]])(bench|scripts|tests)/[A-Za-z0-9_./-]+' |
         sed 's/^[[:space:]]*//' | sort -u)
chmod +x "$out/bin/ferry-gpu-check" "$out/bin/ferry-ab" "$out/scripts/"*.sh

# ---- Shared libraries. Everything ldd resolves is bundled except glibc, the C++/GCC runtime,
# the driver and the CUDA toolkit: those come from the node (cuBLAS alone is hundreds of MiB).
is_system_lib() {
  case "$1" in
    linux-vdso.so*|ld-linux*|libc.so*|libm.so*|libdl.so*|libpthread.so*|librt.so*) return 0 ;;
    libresolv.so*|libutil.so*|libnsl.so*|libanl.so*|libmvec.so*|libBrokenLocale.so*) return 0 ;;
    libstdc++.so*|libgcc_s.so*|libatomic.so*) return 0 ;;
    libcuda.so*|libnvidia-*|libcudart.so*|libcublas.so*|libcublasLt.so*|libnccl.so*) return 0 ;;
    libnvrtc*|libnvJitLink*|libcurand*|libcusparse*|libcusolver*|libcufft*|libnvToolsExt*) return 0 ;;
  esac
  return 1
}

# bundle_deps FILE: copies FILE's non-system dependencies into lib/ (ldd lists the closure).
bundle_deps() {
  local line soname path
  while IFS= read -r line; do
    case "$line" in
      *'=> not found'*)
        soname=${line%% =>*}; soname=${soname//[[:space:]]/}
        is_system_lib "$soname" || die "$1 needs $soname, which is not found here"
        continue ;;
      *'=>'*) ;;
      *) continue ;;
    esac
    soname=${line%% =>*}; soname=${soname//[[:space:]]/}
    path=${line#*=> }; path=${path%% (*}
    is_system_lib "$soname" && continue
    [ -e "$out/lib/$soname" ] || cp -L "$path" "$out/lib/$soname"
  done < <(LD_LIBRARY_PATH="$out/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" ldd "$1")
}

# The project's own shared libraries (shared_core: libfycommon.so, libfykvcodec.so); the
# copied programs no longer find them through their build-tree rpath.
while IFS= read -r f; do
  cp -L "$f" "$out/lib/"
done < <(find "$build" -type f -name 'libfy*.so' -not -path '*.p/*')
for f in "$out"/bin/* "$out"/tests/*; do
  is_elf "$f" || continue
  bundle_deps "$f"
done

# ---- Earlier builds of the kvcodec library, for side-by-side timings (bin/ferry-ab). Only the
# library changes, so the revision's public and private headers must be this tree's: a struct
# that changed would be read with the wrong layout. The headers that only the library's own
# sources include (its device code and the helpers the .cu files share; the emulated tests that
# also include them are not in the bundle) may differ: the library is built with its own. So may
# common/half_cuda.h: device functions only, nothing that crosses the library's interface.
lib_only_headers=(':(exclude)kvcodec/*_dev_int.h' ':(exclude)kvcodec/kvcodec_cuda_int.h'
                  ':(exclude)kvcodec/greedy_walk_int.h' ':(exclude)kvcodec/mult_search_int.h'
                  ':(exclude)common/half_cuda.h')
for rev in ${FERRY_BUNDLE_AB:-}; do
  short=$(git -C "$root" rev-parse --short "$rev^{commit}") || die "FERRY_BUNDLE_AB: no revision $rev"
  git -C "$root" diff --quiet --diff-filter=M "$short" -- 'kvcodec/*.h' 'common/*.h' \
      "${lib_only_headers[@]}" ||
    die "FERRY_BUNDLE_AB: $short's kvcodec or common headers differ from this tree's"
  src="$build-ab/$short/src"
  rm -rf "$src"
  mkdir -p "$src"
  git -C "$root" archive "$short" | tar -x -C "$src"
  if [ -f "$build-ab/$short/build/build.ninja" ]; then
    meson setup --reconfigure "$build-ab/$short/build" "$src" "${setup_args[@]}" >/dev/null
  else
    meson setup "$build-ab/$short/build" "$src" "${setup_args[@]}" >/dev/null
  fi
  meson configure "$build-ab/$short/build" -Dcuda_args=--compress-mode=size
  ninja -C "$build-ab/$short/build" -j"$jobs" kvcodec/libfykvcodec.so
  mkdir -p "$out/lib/ab/$short"
  cp -L "$build-ab/$short/build/kvcodec/libfykvcodec.so" "$out/lib/ab/$short/"
  strip --strip-unneeded "$out/lib/ab/$short/libfykvcodec.so"
  patchelf --force-rpath --set-rpath '$ORIGIN' "$out/lib/ab/$short/libfykvcodec.so"
  echo "bundle: lib/ab/$short/libfykvcodec.so (kvcodec at $short)"
done

# UCX loads its transport modules at run time from <dir of libucs>/ucx/. Ship the ones whose
# own libraries are small and common (shared memory: cma; InfiniBand needs rdma-core, which a
# node with InfiniBand has, so ib and rdmacm are shipped without it: UCX skips a module whose
# libraries are missing).
if [ -e "$out/lib/libucs.so.0" ]; then
  ucs_real=$(ldd "$out/bin/ferry-bench" | awk '/libucs.so/ {print $3}')
  ucx_mod_dir=$(dirname "$(readlink -f "$ucs_real")")/ucx
  for m in "$ucx_mod_dir"/libuct_*.so.0; do
    [ -e "$m" ] || continue
    cp -L "$m" "$out/lib/ucx/"
  done
  for m in "$out"/lib/ucx/*.so.0; do
    [ -e "$m" ] || continue
    while IFS= read -r line; do
      case "$line" in *'=>'*) ;; *) continue ;; esac
      soname=${line%% =>*}; soname=${soname//[[:space:]]/}
      path=${line#*=> }; path=${path%% (*}
      # Another module (rdmacm needs ib) is found beside it; InfiniBand libraries stay out.
      case "$soname" in libuct_*|libibverbs*|librdmacm*|libmlx*|libnl-*) continue ;; esac
      [ "$path" = "not found" ] && continue
      is_system_lib "$soname" && continue
      [ -e "$out/lib/$soname" ] || cp -L "$path" "$out/lib/$soname"
    done < <(ldd "$m")
  done
fi
rmdir "$out/lib/ucx" 2>/dev/null || true

# ---- Strip, then make every ELF file find lib/ relative to itself. DT_RPATH (not RUNPATH)
# on executables also applies to the libraries they load, and wins over a stale
# LD_LIBRARY_PATH on the node.
chmod u+w "$out"/lib/*.so* "$out"/lib/ucx/*.so* 2>/dev/null || true
for f in "$out"/bin/* "$out"/tests/*; do
  is_elf "$f" || continue
  strip --strip-all "$f"
  patchelf --force-rpath --set-rpath '$ORIGIN/../lib' "$f"
done
for f in "$out"/lib/*.so*; do
  strip --strip-unneeded "$f" 2>/dev/null || true
  patchelf --force-rpath --set-rpath '$ORIGIN' "$f"
done
for f in "$out"/lib/ucx/*.so*; do
  [ -e "$f" ] || continue
  strip --strip-unneeded "$f" 2>/dev/null || true
  patchelf --force-rpath --set-rpath '$ORIGIN:$ORIGIN/..' "$f"
done

# ---- What was built, from where.
{
  echo "ferry bundle"
  echo "built: $(date -u +%Y-%m-%dT%H:%M:%SZ) on $(uname -m)"
  echo "commit: $(git -C "$root" rev-parse --short HEAD 2>/dev/null || echo unknown)$(git -C "$root" diff --quiet HEAD 2>/dev/null || echo ' (modified)')"
  echo "nvcc: $(nvcc --version 2>/dev/null | sed -n 's/.*release \([^,]*\),.*/\1/p' | head -n1)"
  echo "glibc (build host): $(getconf GNU_LIBC_VERSION 2>/dev/null)"
  echo "cuda archs: sm_80, sm_90 (+ compute_90 PTX)"
  echo
  echo "node must provide: glibc >= the build host's, libstdc++, NVIDIA driver (libcuda)"
  echo "  and the CUDA 13 runtime libraries the binaries name:"
  for f in "$out"/bin/* "$out"/tests/*; do
    is_elf "$f" || continue
    readelf -d "$f" | sed -n 's/.*Shared library: \[\(.*\)\]/\1/p'
  done | grep -E '^lib(cudart|cublas|cublasLt|nccl|nvrtc|nvJitLink)' | sort -u | sed 's/^/    /'
  echo
  echo "files (bytes):"
  (cd "$out" && find . -type f ! -name MANIFEST.txt -printf '%s\t%P\n' | sort -k2)
} > "$out/MANIFEST.txt"

# ---- Size limit (the GPU node takes 64 MiB of transfer in all), then the archive.
bytes=$(du -sb "$out" | cut -f1)
mib=$(awk -v b="$bytes" 'BEGIN { printf "%.1f", b / 1048576 }')
echo "bundle: $out: $mib MiB uncompressed (limit $max_mib MiB)"
du -sh "$out"/bin "$out"/tests "$out"/lib 2>/dev/null | sed 's/^/bundle:   /'
if [ "$bytes" -gt $((max_mib * 1048576)) ]; then
  echo "bundle: largest files:" >&2
  (cd "$out" && find . -type f -printf '%s\t%P\n' | sort -rn | head -n 10) >&2
  die "over the $max_mib MiB limit"
fi
tar -C "$dist" -czf "$dist/$name.tar.gz" "$name"
echo "bundle: $dist/$name.tar.gz: $(du -h "$dist/$name.tar.gz" | cut -f1) compressed"
# The same as .tar.xz where xz exists: a third of the gzip size, because xz's window spans the
# CUDA binaries' repeated device code, which leaves more of a 64 MiB transfer for the model.
if command -v xz > /dev/null; then
  tar -C "$dist" -cf - "$name" | xz -9e -T"${FERRY_JOBS:-2}" > "$dist/$name.tar.xz"
  echo "bundle: $dist/$name.tar.xz: $(du -h "$dist/$name.tar.xz" | cut -f1) compressed"
fi
