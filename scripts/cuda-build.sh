#!/usr/bin/env bash
# Build eabfit with the `cuda` feature on a machine that has no GPU and no CUDA,
# so that the binary can be carried to the GPU machine (H200, driver 580 / CUDA 13.0).
#
# What it does (each step is skipped when already done):
#   1. installs a CUDA 13.0 toolchain (nvcc, nvvm, crt, cccl, cudart, nvrtc, curand,
#      cublas) from PyPI wheels into $EABFIT_CUDA_DIR (default <repo>/.cuda, git-ignored);
#      the versions are pinned to 13.0.x: PTX from a newer nvcc does not load on driver 580;
#   2. adds the unversioned .so links the wheels lack (libcublas.so, libcublasLt.so,
#      libnvrtc.so, libcudart.so -> .so.13; libcurand.so -> .so.10);
#   3. builds a link-time stub lib/stubs/libcuda.so (soname libcuda.so.1) defining every
#      driver function cudarc 0.19.10 declares (names read from its registry source);
#      the real libcuda.so.1 of the driver is used at run time;
#   4. runs `cargo build --release --features cuda [EXTRA ARGS]` into <repo>/target-cuda
#      (git-ignored), with CUDA_COMPUTE_CAP=90 and CUDARC_CUDA_VERSION=13000
#      (`cargo test` instead of `cargo build` when EXTRA ARGS hold --no-run);
#   4b. with `--features nccl` (data parallel over GPUs, docs/parallel.md): installs NCCL from
#      the PyPI wheel nvidia-nccl-cu13 into $EABFIT_CUDA_DIR/nccl (its own stamp, so the CUDA
#      wheels above stay as they are) and adds the libnccl.so link the linker needs to the
#      CUDA lib folder;
#   5. copies the stripped release binary to <repo>/.device-bin/eabfit (git-ignored), or,
#      when that is over the 64 MiB carry limit, .device-bin/eabfit.xz instead.
#
# Run:   scripts/cuda-build.sh                       # release binary
#        scripts/cuda-build.sh --features nccl       # with NCCL (several GPUs)
#        scripts/cuda-build.sh --tests --no-run      # also the test binaries, cuda feature on
#        scripts/cuda-build.sh --bin eabfit
# Extra args go to cargo as they are; test binaries show as "Executable ..." lines.
# A clean build took 28 min on 2 cores here (candle-kernels' nvcc is the long part);
# rebuilds after a source change take under a minute: keep target-cuda/.
#
# Needs: python3 with pip and access to PyPI (1.2 GB of wheels, once), gcc, strip, xz,
# cargo, and the crates already fetched into ~/.cargo/registry (cudarc 0.19.10 among them;
# the script runs `cargo fetch` if it is missing).
# On the GPU machine run the binary with
#   LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib
# and, built with nccl, .../site-packages/nvidia/nccl/lib added to it: such a binary links
# libnccl.so.2 dynamically (candle forces cudarc's dynamic linking), so it needs the library at
# start even on one GPU, where it never calls it. Without the feature nothing needs NCCL.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
cuda_dir=${EABFIT_CUDA_DIR:-$repo/.cuda}
cu13=$cuda_dir/nvidia/cu13
target_dir=${CARGO_TARGET_DIR:-$repo/target-cuda}
device_bin=$repo/.device-bin
cudarc_version=0.19.10

wheels=(
  nvidia-cuda-nvcc==13.0.88 nvidia-cuda-crt==13.0.88 nvidia-nvvm==13.0.88
  nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88
  nvidia-curand==10.4.0.35 nvidia-cublas==13.1.0.3
)
log() { echo "cuda-build: $*" >&2; }

# 1. toolchain ------------------------------------------------------------------------
stamp=$cuda_dir/.installed
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "${wheels[*]}" ] || [ ! -x "$cu13/bin/nvcc" ]; then
  log "installing CUDA 13.0 wheels into $cuda_dir (about 1.2 GB) ..."
  tmp_dir=$cuda_dir.part
  rm -rf "$tmp_dir"
  python3 -m pip install -q --no-deps --target "$tmp_dir" "${wheels[@]}"
  rm -rf "$cuda_dir"
  mv "$tmp_dir" "$cuda_dir"
  echo "${wheels[*]}" > "$stamp"
fi
nvcc_release=$("$cu13/bin/nvcc" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[ "$nvcc_release" = 13.0 ] || { log "expected nvcc 13.0, got '$nvcc_release'"; exit 1; }

# 2. unversioned links ------------------------------------------------------------------
for pair in cublas:13 cublasLt:13 nvrtc:13 cudart:13 curand:10; do
  name=${pair%%:*} major=${pair##*:}
  so=$cu13/lib/lib$name.so.$major
  [ -e "$so" ] || { log "missing $so"; exit 1; }
  [ -e "$cu13/lib/lib$name.so" ] || ln -s "lib$name.so.$major" "$cu13/lib/lib$name.so"
done

# 3. libcuda stub -------------------------------------------------------------------------
stub_dir=$cu13/lib/stubs
if [ ! -f "$stub_dir/libcuda.so" ]; then
  sys_rs=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-$cudarc_version/src/driver/sys/mod.rs 2>/dev/null | head -n1 || true)
  if [ -z "$sys_rs" ]; then
    (cd "$repo" && cargo fetch -q)
    sys_rs=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-$cudarc_version/src/driver/sys/mod.rs | head -n1)
  fi
  work=$(mktemp -d)
  trap 'rm -rf "$work"' EXIT
  # every `pub unsafe fn cuX(` wrapper and every `fn cuX(` in its extern "C" blocks
  sed -nE 's/^[[:space:]]*(pub unsafe )?fn (cu[A-Za-z0-9_]+)\(.*/\2/p' "$sys_rs" | sort -u > "$work/syms"
  n=$(wc -l < "$work/syms")
  [ "$n" -gt 300 ] || { log "only $n driver symbols found in $sys_rs"; exit 1; }
  {
    echo "/* link-time stub of libcuda.so.1, generated by scripts/cuda-build.sh from $sys_rs */"
    while read -r s; do echo "int $s(void) { return 999; /* CUDA_ERROR_UNKNOWN */ }"; done < "$work/syms"
  } > "$work/libcuda_stub.c"
  mkdir -p "$stub_dir"
  gcc -shared -fPIC -O0 -w -Wl,-soname,libcuda.so.1 -o "$work/libcuda.so" "$work/libcuda_stub.c"
  mv "$work/libcuda.so" "$stub_dir/libcuda.so"
  log "stub $stub_dir/libcuda.so with $n driver symbols"
fi

# 4b. NCCL, only for --features nccl ------------------------------------------------------------
nccl_wheel=nvidia-nccl-cu13==2.32.3
nccl_dir=$cuda_dir/nccl
nccl_lib=$nccl_dir/nvidia/nccl/lib
if [[ " $* " == *nccl* ]]; then
  if [ ! -f "$nccl_dir/.installed" ] || [ "$(cat "$nccl_dir/.installed")" != "$nccl_wheel" ]; then
    log "installing $nccl_wheel into $nccl_dir ..."
    rm -rf "$nccl_dir.part"
    python3 -m pip install -q --no-deps --target "$nccl_dir.part" "$nccl_wheel"
    rm -rf "$nccl_dir"
    mv "$nccl_dir.part" "$nccl_dir"
    echo "$nccl_wheel" > "$nccl_dir/.installed"
  fi
  [ -e "$nccl_lib/libnccl.so.2" ] || { log "missing $nccl_lib/libnccl.so.2"; exit 1; }
  # In the CUDA lib folder already on the link path: RUSTFLAGS stay as they are, so a
  # target dir built without nccl is reused (only cudarc, candle and eabfit rebuild).
  [ -e "$cu13/lib/libnccl.so" ] || ln -s "$nccl_lib/libnccl.so.2" "$cu13/lib/libnccl.so"
fi

# 4. build ----------------------------------------------------------------------------------
export PATH=$cu13/bin:$PATH
export CUDA_HOME=$cu13
export CUDA_COMPUTE_CAP=90
export CUDARC_CUDA_VERSION=13000
export CARGO_TARGET_DIR=$target_dir
export RUSTFLAGS="${RUSTFLAGS:+$RUSTFLAGS }-L native=$cu13/lib -L native=$stub_dir"
# `--no-run` is a `cargo test` flag: with it, build the test binaries through `cargo test`
sub=build
for a in "$@"; do [ "$a" = --no-run ] && sub=test; done
log "cargo $sub --release --features cuda $* (target dir $target_dir)"
start=$(date +%s)
(cd "$repo" && cargo "$sub" --release --features cuda "$@")
log "cargo build done in $(( $(date +%s) - start )) s"

# 5. stripped binary for the GPU machine ------------------------------------------------------
# At most 64 MiB travels at once: the plain stripped binary while it fits, else eabfit.xz
# only (unpack there with `xz -d eabfit.xz`). Only one of the two is left in .device-bin.
bin=$target_dir/release/eabfit
limit=${EABFIT_CARRY_LIMIT:-$(( 64 * 1048576 ))}
if [ -f "$bin" ]; then
  mkdir -p "$device_bin"
  strip -o "$device_bin/eabfit.part" "$bin"
  size=$(stat -c %s "$device_bin/eabfit.part")
  if [ "$size" -le "$limit" ]; then
    mv "$device_bin/eabfit.part" "$device_bin/eabfit"
    rm -f "$device_bin/eabfit.xz"
    out=$device_bin/eabfit
  else
    xz -T0 -6 -c "$device_bin/eabfit.part" > "$device_bin/eabfit.xz.part"
    mv "$device_bin/eabfit.xz.part" "$device_bin/eabfit.xz"
    rm -f "$device_bin/eabfit.part" "$device_bin/eabfit"
    out=$device_bin/eabfit.xz
    log "stripped binary is $(( size / 1048576 )) MiB, over the carry limit ($(( limit / 1048576 )) MiB): wrote $out instead"
  fi
  log "binary $out ($(( $(stat -c %s "$out") / 1048576 )) MiB, built $(date -r "$bin" '+%F %T'))"
else
  log "no release binary at $bin (not part of this build)"
fi
