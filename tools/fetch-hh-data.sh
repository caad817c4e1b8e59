#!/usr/bin/env bash
# Puts the HH-RLHF harmless single-turn splits (harmless_train_gt / harmless_train_w2s /
# harmless_test, 4000 pairs each, 6.3 MB, MIT) into data/hh-harmless-single-turn/ of this
# checkout, where the examples, the tests and the README read them.
#
#   tools/fetch-hh-data.sh             download from the pinned commit of the paper's repository
#   tools/fetch-hh-data.sh --from DIR  copy from a local copy of the three files (no network)
#
# Either way every file is checked against its SHA-256 below before it is moved into place, so
# what lands is byte for byte the data the paper's code used. Idempotent: files already present
# with the right digest are left alone. The data is not committed: its source asks for it to be
# read from its own distribution.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
dest="$root/data/hh-harmless-single-turn"
# keven980716/weak-to-strong-deception (MIT, copyright 2024 Wenkai Yang), which takes the pairs
# from Anthropic's HH-RLHF harmless-base (MIT).
commit=a3958f6dfe9a156dc8cedff196f674538bef7ee6
base="https://raw.githubusercontent.com/keven980716/weak-to-strong-deception/$commit/weak-to-strong/data/hh-single-turn"
declare -A sha256=(
  [harmless_train_gt]=a3fcbc951d6f67f00c8b327ad05970300e4f67c2e9529657add1ebe38875c1a7
  [harmless_train_w2s]=4664e946f7eda2d033bfc85dfe25d4355bfeb2d1c8e3db462dbfc7dc1bbef2c5
  [harmless_test]=cc7f5163a3ca0179a01553a13ac9739251ce8c63944929e230a23f45a755e68e
)

from=""
case "${1:-}" in
  --from) from=${2:?"--from needs a folder holding the three harmless_*.jsonl files"} ;;
  "") ;;
  *) echo "usage: $0 [--from DIR]" >&2; exit 2 ;;
esac

digest() { sha256sum "$1" | cut -d' ' -f1; }

mkdir -p "$dest"
for split in harmless_train_gt harmless_train_w2s harmless_test; do
  file="$dest/$split.jsonl"
  want=${sha256[$split]}
  if [[ -f "$file" && "$(digest "$file")" == "$want" ]]; then
    continue
  fi
  tmp="$file.partial"
  if [[ -n "$from" ]]; then
    cp "$from/$split.jsonl" "$tmp"
    chmod u+w "$tmp"
  elif ! curl --fail --silent --show-error --location --retry 3 --output "$tmp" "$base/$split.jsonl"; then
    rm -f "$tmp"
    echo "fetch-hh-data: could not download $base/$split.jsonl; with a copy of the three files" \
      "at hand, run: $0 --from DIR" >&2
    exit 1
  fi
  got=$(digest "$tmp")
  if [[ "$got" != "$want" ]]; then
    rm -f "$tmp"
    echo "fetch-hh-data: $split.jsonl has SHA-256 $got, expected $want; nothing was changed" >&2
    exit 1
  fi
  mv "$tmp" "$file"
done
cat > "$dest/README.md" <<EOF
# HH-RLHF harmless, single-turn

Placed here by \`tools/fetch-hh-data.sh\` (not committed). Three splits of 4000 single-turn
harmlessness preference pairs each, \`{"chosen": str, "rejected": str}\` per line, both strings
whole dialogues \`"\n\nHuman: <prompt>\n\nAssistant: <response>"\` sharing the prompt:
harmless_train_gt (ground truth for the ceilings), harmless_train_w2s (labelled by the weak
model for the student), harmless_test.

Source: weak-to-strong/data/hh-single-turn/ of keven980716/weak-to-strong-deception at commit
$commit (MIT licence, copyright 2024 Wenkai Yang), from Anthropic's HH-RLHF harmless-base (MIT
licence). SHA-256 of each file is checked by the script.
EOF
echo "HH-RLHF harmless single-turn splits in $dest (SHA-256 checked)"
