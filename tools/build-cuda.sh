#!/usr/bin/env bash
# Builds a CUDA-enabled binary of this workspace on a machine WITHOUT a GPU or CUDA toolkit, for
# running on a lent GPU machine (x86-64, driver for CUDA 13.0). Everything comes from PyPI:
# nvcc/nvvm/crt/cccl headers pinned to 13.0 (PTX newer than the driver's CUDA version is
# rejected: "Unsupported .version 9.5"), cuBLAS/cuRAND/cudart/NVRTC for linking, and an empty
# stub `libcuda.so.1` (the real one comes with the driver). The final link ignores unresolved
# driver symbols; they bind to the driver's libcuda at load time.
#
#   tools/build-cuda.sh [PACKAGE] [BINARY]      (default: model-server load-client)
#   tools/build-cuda.sh bench                   (load-client and the `workloads` bench, one build)
#
# Output: $CARGO_TARGET_DIR/release/BINARY (default target dir: target-cuda/); for `bench`
# also $CARGO_TARGET_DIR/release/workloads (copied from deps/). On the GPU
# machine, put the folders holding libcublas.so.13, libcurand.so.10, libcudart.so.13 and
# libnvrtc.so.13 (PyTorch's wheels have them) on LD_LIBRARY_PATH. A first build takes ~25 min
# on 2 cores (candle's CUDA kernels).
set -euo pipefail
package=${1:-model-server}
binary=${2:-load-client}
with_bench=false
if [ "$package" = bench ]; then
  package=model-server binary=load-client with_bench=true
fi
root=$(cd "$(dirname "$0")/.." && pwd)
venv=${CUDA_VENV:-/tmp/superficial-cuda-venv}
if [ ! -x "$venv/bin/pip" ]; then
  python3 -m venv "$venv"
fi
"$venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-nvvm==13.0.*" \
  "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-crt==13.0.*" "nvidia-cuda-cccl==13.0.*" \
  "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-nvrtc==13.0.*"
cuda=$(echo "$venv"/lib/python3*/site-packages/nvidia/cu13)
(
  cd "$cuda/lib"
  for lib in cublas cublasLt cudart nvrtc; do ln -sf "lib$lib.so.13" "lib$lib.so"; done
  ln -sf libcurand.so.10 libcurand.so
  echo "" > /tmp/superficial-empty.c
  cc -shared -o libcuda.so -Wl,-soname,libcuda.so.1 /tmp/superficial-empty.c
)
linker=/tmp/superficial-cuda-linker.sh
cat > "$linker" <<LINK
#!/bin/sh
# Only the final binary links against the stub; build scripts must run here.
case "\$*" in
  *deps/${binary//-/_}-*|*deps/workloads-*) exec cc "\$@" -Wl,--unresolved-symbols=ignore-all -Wl,--push-state,--no-as-needed -L$cuda/lib -lcuda -Wl,--pop-state ;;
  *) exec cc "\$@" ;;
esac
LINK
chmod +x "$linker"
export PATH="$cuda/bin:$PATH" CUDA_ROOT="$cuda" CUDA_PATH="$cuda" CUDA_HOME="$cuda"
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER="$linker"
export CARGO_PROFILE_RELEASE_DEBUG=false CARGO_PROFILE_RELEASE_STRIP=true
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$root/target-cuda}
cd "$root"
if ! $with_bench; then
  cargo build --release -p "$package" --features cuda --bin "$binary"
  echo "built $CARGO_TARGET_DIR/release/$binary"
  exit 0
fi
# One cargo invocation, so both targets share one feature-unified build of candle.
bench=$(cargo build --release -p model-server -p superficial-training \
  --features model-server/cuda,superficial-training/cuda --bin load-client --bench workloads \
  --message-format=json | python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "workloads":
        print(m["executable"])')
cp "$bench" "$CARGO_TARGET_DIR/release/workloads"
echo "built $CARGO_TARGET_DIR/release/load-client and $CARGO_TARGET_DIR/release/workloads"
