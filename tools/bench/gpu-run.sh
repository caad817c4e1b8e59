#!/usr/bin/env bash
# The side-by-side harness on a lent GPU machine (one short run, no Rust toolchain needed there).
#
# Here (no GPU needed, ~25 min on 2 cores):
#   tools/build-cuda.sh bench
#   mkdir -p .gpu && gzip -c target-cuda/release/workloads > .gpu/workloads.gz \
#     && gzip -c target-cuda/release/load-client > .gpu/load-client.gz
# There (the folder `.gpu` carried along; its python3 must import torch + transformers):
#   tools/bench/gpu-run.sh .gpu      # writes gpu.txt, gpu.md, gpu.json into $OUT (or /tmp)
#
# The CUDA libraries the binaries link (cuBLAS, cuRAND, cudart, NVRTC) are taken from the
# Python environment's NVIDIA wheels (PyTorch's); the driver's libcuda comes with the machine.
set -uo pipefail
carried=${1:-.gpu}
out=${OUT:-/tmp/gpu-bench}
bin=/tmp/superficial-gpu-bin
mkdir -p "$out" "$bin"
for f in workloads load-client; do
  gunzip -c "$carried/$f.gz" > "$bin/$f" && chmod +x "$bin/$f" || exit 1
done
libs=$(python3 - <<'PY'
import glob, os, site
dirs = set()
for root in site.getsitepackages():
    for pattern in ("libcublas.so.*", "libcurand.so.*", "libcudart.so.*", "libnvrtc.so.*"):
        for path in glob.glob(os.path.join(root, "nvidia", "**", pattern), recursive=True):
            dirs.add(os.path.dirname(path))
print(":".join(sorted(dirs)))
PY
)
export LD_LIBRARY_PATH="$libs:${LD_LIBRARY_PATH:-}"
{
  date -u
  nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv
  python3 -c 'import torch, transformers; print("torch", torch.__version__, "transformers", transformers.__version__)'
  echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  # Smoke test: one fp32 gemm through candle on the GPU.
  printf 'sgemm-2048\nquit\n' | BENCH_DEVICE=cuda:0 "$bin/workloads" --serve
} 2>&1 | tee "$out/gpu.txt"
python3 tools/bench/compare.py --device cuda:0 --binary "$bin/workloads" \
  --load-client "$bin/load-client" --python python3 --reps 7 --pause 0.05 \
  --json "$out/gpu.json" 2>&1 | tee "$out/gpu.md"
