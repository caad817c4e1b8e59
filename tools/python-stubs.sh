#!/usr/bin/env bash
# Generates the Python stubs of proto/w2s/v1/w2s.proto into clients/python/w2s/v1/ with
# grpcio-tools (the version pinned in tools/prepare-test-assets.sh).
#   tools/python-stubs.sh [PYTHON]           write them
#   tools/python-stubs.sh --check [PYTHON]   fail when the checked-in stubs differ
set -euo pipefail
root=$(cd "$(dirname "$0")/.." && pwd)
check=false
if [[ "${1:-}" == "--check" ]]; then check=true; shift; fi
python=${1:-"$root/tests/.cache/pyenv/bin/python"}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$python" - "$root/proto" "$out" <<'PY'
import os, sys
import grpc_tools
from grpc_tools import protoc
proto, out = sys.argv[1], sys.argv[2]
include = os.path.join(os.path.dirname(grpc_tools.__file__), "_proto")
code = protoc.main(["grpc_tools.protoc", f"-I{proto}", f"-I{include}", f"--python_out={out}",
                    f"--pyi_out={out}", f"--grpc_python_out={out}",
                    os.path.join(proto, "w2s", "v1", "w2s.proto")])
sys.exit(code)
PY
touch "$out/w2s/__init__.py" "$out/w2s/v1/__init__.py"
target="$root/clients/python/w2s"
if $check; then
  if ! diff -r "$out/w2s" "$target" >/dev/null; then
    echo "clients/python/w2s differs from what proto/w2s/v1/w2s.proto generates: run tools/python-stubs.sh" >&2
    diff -r "$out/w2s" "$target" | head -20 >&2
    exit 1
  fi
else
  rm -rf "$target"
  cp -r "$out/w2s" "$target"
fi
