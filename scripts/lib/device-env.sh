# Sourced by the GPU tasks of scripts/gpu.sh (from any folder): the Python that has torch ($py),
# the CUDA 13 libraries on LD_LIBRARY_PATH, `unxz_to FILE.xz DEST` (an executable DEST, through
# xz or, where the image lacks it, Python's lzma) and `device_bin DIR`, which prints the eabfit
# binary to run: $EABFIT_BIN if set, else the carried .device-bin/eabfit (or its .xz) copied into
# DIR. Each function returns non-zero on failure, so `bin=$(device_bin DIR) || exit 1` stops.
device_env_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
py=${PYTHON:-/opt/torch/.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3)
cu13=${EABFIT_CUDA_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}
if [ -d "$cu13" ]; then export LD_LIBRARY_PATH=$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi

unxz_to() {
  if command -v xz >/dev/null 2>&1; then
    xz -dc "$1" > "$2" || return 1
  else
    "$py" -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
      "$1" "$2" || return 1
  fi
  chmod +x "$2"
}

device_bin() {
  if [ -n "${EABFIT_BIN:-}" ]; then echo "$EABFIT_BIN"; return; fi
  local carried=$device_env_root/.device-bin/eabfit bin=$1/eabfit
  if [ -f "$carried" ]; then
    cp "$carried" "$bin" && chmod +x "$bin" || return 1
  elif [ -f "$carried.xz" ]; then
    unxz_to "$carried.xz" "$bin" || return 1
  else
    echo "no .device-bin/eabfit or .device-bin/eabfit.xz (build it with scripts/cuda-build.sh)" >&2
    return 1
  fi
  echo "$bin"
}
