#!/usr/bin/env bash
# The Python the transformers checks run under: a virtual environment with pinned torch,
# transformers, peft and gguf (transformers' GGUF reader), made once from PyPI and kept in the cache folder beside the assets.
# Prints the interpreter's path on stdout (progress goes to stderr). Fails, never skips, when
# the install fails: the tests that need it are no less required for a missing package.
# Folder: $EABFIT_VENV, else $EABFIT_CACHE (or <repo>/.cache/assets)/venv-<pins>, so that
# changing a pin makes a new environment instead of patching an old one.
# PyPI's torch is the CUDA build; it runs on a CPU, and with its nvidia-* wheels takes ~5 GB.
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
pins=(torch==2.15.0 transformers==5.25.0 peft==0.21.2 safetensors==0.8.0 numpy==2.4.6 gguf==0.19.0)
tag=$(printf '%s\n' "${pins[@]}" | sha256sum | cut -c1-12)
cache=${EABFIT_CACHE:-$repo/.cache/assets}
venv=${EABFIT_VENV:-$cache/venv-$tag}
mkdir -p "$(dirname "$venv")"

# One installer at a time (helpers and CI may share the cache); a finished environment carries
# a marker written last, so an interrupted install is redone rather than trusted.
exec 9>"$venv.lock"
flock 9
if [ ! -f "$venv/.eabfit-ready" ]; then
  echo "py-env: installing ${pins[*]} into $venv (about 5 GB, once) ..." >&2
  rm -rf "$venv"
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q --disable-pip-version-check "${pins[@]}" >&2
  "$venv/bin/python" -c "import torch, transformers, peft, gguf" >&2
  printf '%s\n' "${pins[@]}" > "$venv/.eabfit-ready"
fi
echo "$venv/bin/python"
