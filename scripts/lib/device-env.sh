# Sourced by GPU tasks of scripts/gpu.sh, from the repo root: the Python that has torch ($py), the
# CUDA 13 libraries on LD_LIBRARY_PATH, and `device_bin DIR`, which prints the eabfit binary to
# run: $EABFIT_BIN if set, else the carried .device-bin/eabfit (or its .xz) copied into DIR.
py=${PYTHON:-/opt/torch/.venv/bin/python}
[ -x "$py" ] || py=$(command -v python3)
cu13=${EABFIT_CUDA_LIB:-/opt/torch/.venv/lib/python3.12/site-packages/nvidia/cu13/lib}
if [ -d "$cu13" ]; then export LD_LIBRARY_PATH=$cu13${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}; fi

device_bin() {
  if [ -n "${EABFIT_BIN:-}" ]; then echo "$EABFIT_BIN"; return; fi
  local bin=$1/eabfit
  # Each step returns on failure, so that `bin=$(device_bin DIR)` fails under set -e.
  if [ -f .device-bin/eabfit ]; then cp .device-bin/eabfit "$bin" || return 1
  else xz -dc .device-bin/eabfit.xz > "$bin" || return 1; fi
  chmod +x "$bin" || return 1
  echo "$bin"
}
