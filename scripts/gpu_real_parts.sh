#!/usr/bin/env bash
# The test suite's real model on the GPU host, in parts (scripts/split_parts.py made .real-parts/p00 ... pNN here).
#   bash scripts/gpu_real_parts.sh store   one call per part, carrying only .real-parts/pK: copies the part(s) that
#                                          travelled into $PARTS (/tmp/real-parts, which outlives the replaced working
#                                          copy while the machine stays warm), checks their sha256, says what is missing
#   bash scripts/gpu_real_parts.sh join    concatenates the parts into $RINGLLM_CACHE/real-model/NAME (default
#                                          /tmp/real-model/), checks the whole file's sha256 and writes NAME.sha256
#                                          beside it, as tests/real_model.py does (so RINGLLM_CACHE=/tmp finds it too);
#                                          prints the path. Does nothing but print it when it is already there.
# Each call within ~30 s of the last, so that the machine (and /tmp) stays the same one.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
P=${PARTS:-/tmp/real-parts}
DEST=${RINGLLM_CACHE:-/tmp}/real-model
mkdir -p "$P"

part_ok() {  # part_ok K SHA SIZE NAME: the stored part is there, of this size and digest
  [ -f "$P/$4" ] && [ "$(stat -c %s "$P/$4")" = "$3" ] && [ "$(sha256sum "$P/$4" | cut -d' ' -f1)" = "$2" ]
}

store() {
  local found=0 d
  for d in "$ROOT"/.real-parts/p*/; do
    [ -d "$d" ] || continue
    cp -f "$d"* "$P"/
    found=1
  done
  [ $found = 1 ] || { echo "store: no .real-parts/pK folder travelled (name one in carry)"; exit 1; }
  local have="" miss="" bad=0 k sum size name
  while read -r _ k sum size name; do
    if [ -f "$P/$name" ]; then
      if part_ok "$k" "$sum" "$size" "$name"; then have="$have $k"; else echo "store: BAD part $k ($name)"; bad=1; fi
    else
      miss="$miss $k"
    fi
  done < <(grep '^PART ' "$P/MANIFEST")
  echo "store: $P holds parts:${have:- none}; missing:${miss:- none} (of $(awk '$1=="PARTS"{print $2}' "$P/MANIFEST"))"
  [ $bad = 0 ]
}

join() {
  local m="$P/MANIFEST" fsum fsize fname
  [ -f "$m" ] || { echo "join: no manifest in $P: store the parts first"; exit 1; }
  read -r _ fsum fsize fname < <(grep '^FILE ' "$m")
  local out="$DEST/$fname"
  if [ -f "$out" ] && [ "$(stat -c %s "$out")" = "$fsize" ] && [ "$(cat "${out%.gguf}.sha256" 2>/dev/null)" = "$fsum" ]; then
    echo "$out"
    return 0
  fi
  local missing="" k sum size name
  while read -r _ k sum size name; do
    part_ok "$k" "$sum" "$size" "$name" || missing="$missing $k"
  done < <(grep '^PART ' "$m")
  [ -z "$missing" ] || { echo "join: parts missing or bad:$missing (store them again)"; exit 1; }
  mkdir -p "$DEST"
  grep '^PART ' "$m" | sort -n -k2 | while read -r _ k sum size name; do cat "$P/$name"; done > "$out.partial"
  local got
  got=$(sha256sum "$out.partial" | cut -d' ' -f1)
  [ "$got" = "$fsum" ] || { rm -f "$out.partial"; echo "join: sha256 $got != $fsum"; exit 1; }
  mv "$out.partial" "$out"
  printf %s "$fsum" > "${out%.gguf}.sha256"
  echo "$out"
}

case "${1:-}" in
  store) store ;;
  join) join ;;
  *) echo "usage: gpu_real_parts.sh store|join"; exit 2 ;;
esac
