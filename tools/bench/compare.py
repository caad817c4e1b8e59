#!/usr/bin/env python3
"""Side-by-side benchmark: this project against PyTorch + transformers on the same machine.

    python3 tools/bench/compare.py                 # 5 repetitions, markdown table on stdout
    python3 tools/bench/compare.py --reps 7 --only w64 --json out.json
    python3 tools/bench/compare.py --device cuda:0 --binary ./workloads --load-client ./load-client

Runs the project's `workloads` bench and `torch_peer.py` as two long-lived processes and asks
each for one repetition at a time, alternating which goes first, so load drift hits both
alike. Refuses to start on a busy machine (1-minute load average above --max-load; PyTorch's
OpenMP threads degrade many-fold when another process holds a core). Prints medians, spreads
(min-max), the ratio PyTorch/project (above 1: the project is faster) and achieved GFLOP/s
against the sgemm peak measured in the same run. Without a Python that imports torch and
transformers (--python, $BENCH_PYTHON or tools/bench/.venv) only the project side runs.
With --device cuda:N both sides run on that GPU (the project's bench must be a CUDA build:
tools/build-cuda.sh; --binary takes a prebuilt one) and the load check is skipped (a GPU run
is bound by the GPU, and the lent machines' load averages count other tenants).
Standard library only; never part of CI (timings are not assertions).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))

# Model shapes: (vocab, layers, width).
SHAPES = {"gpt2s": (50257, 12, 768), "w32": (768, 2, 32), "w64": (768, 2, 64)}


def flops(name):
    """Floating-point operations of one repetition (multiply-add = 2), the usual estimate:
    2 x parameters x tokens forward (with the LM head where the workload has one), causal
    attention's QK^T and AV counted in full, training = 3 x forward."""
    shape, rest = name.split("-", 1)
    if shape == "sgemm":
        n = int(rest)
        return 2.0 * n**3
    kind, dims = rest.rsplit("-", 1)
    dims = [int(d) for d in dims.split("x")]
    vocab, layers, width = SHAPES[shape]
    sequences = dims[-2] * (2 if kind in ("reward-step", "simpo-step", "dpo-step") else 1)
    t = dims[-1]
    tokens = sequences * t
    forward = 2.0 * tokens * layers * 12 * width**2 + 4.0 * layers * sequences * t * t * width
    if kind != "reward-forward" and kind != "reward-step":
        forward += 2.0 * tokens * width * vocab
    return forward * (3 if kind.endswith("step") else 1)


class Peer:
    """A workload server speaking the line protocol."""

    def __init__(self, label, argv, env=None):
        self.label = label
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     text=True, env=env, cwd=ROOT)

    def ask(self, request):
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline().strip()
        if not answer:
            raise RuntimeError(f"{self.label} exited while answering {request!r}")
        return answer

    def time(self, workload):
        answer = self.ask(workload)
        if answer.startswith("error"):
            raise RuntimeError(f"{self.label}, {workload}: {answer}")
        return float(answer)

    def close(self):
        try:
            self.ask("quit")
        except (RuntimeError, BrokenPipeError):
            pass
        self.proc.wait(timeout=30)


def project_binary():
    out = subprocess.run(
        ["cargo", "bench", "-p", "superficial-training", "--bench", "workloads", "--no-run",
         "--message-format=json"], cwd=ROOT, check=True, capture_output=True, text=True).stdout
    for line in out.splitlines():
        msg = json.loads(line)
        if msg.get("reason") == "compiler-artifact" and msg.get("executable") \
                and msg["target"]["name"] == "workloads":
            return msg["executable"]
    raise RuntimeError("cargo did not report the workloads bench executable")


def torch_python(explicit):
    candidates = [explicit, os.environ.get("BENCH_PYTHON"),
                  os.path.join(HERE, ".venv", "bin", "python")]
    for python in filter(None, candidates):
        python = shutil.which(python) or python
        if os.path.exists(python) and subprocess.run(
                [python, "-c", "import torch, transformers"], capture_output=True).returncode == 0:
            return python
    return None


def describe(times):
    return statistics.median(times), min(times), max(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=5, help="repetitions per side (median of these)")
    parser.add_argument("--only", default="", help="run workloads whose name contains this")
    parser.add_argument("--max-load", type=float, default=0.5, help="refuse above this load average")
    parser.add_argument("--force", action="store_true", help="run even on a busy machine")
    parser.add_argument("--pause", type=float, default=0.5,
                        help="seconds of idle before each repetition")
    parser.add_argument("--python", help="a Python with torch and transformers")
    parser.add_argument("--json", help="also write the measurements here")
    parser.add_argument("--no-server", action="store_true",
                        help="skip the server round trips (load-client; project only)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (both sides)")
    parser.add_argument("--binary", help="a prebuilt workloads bench (default: cargo builds it)")
    parser.add_argument("--load-client", help="a prebuilt load-client (default: cargo runs it)")
    args = parser.parse_args()
    on_gpu = args.device != "cpu"
    env = dict(os.environ, BENCH_DEVICE=args.device)

    load = os.getloadavg()[0]
    if load > args.max_load and not args.force and not on_gpu:
        sys.exit(f"load average {load:.2f} > {args.max_load}: the machine is busy; "
                 "a comparison is only honest on a quiet machine (--force to run anyway)")

    binary = args.binary or project_binary()
    peers = [Peer("project", [os.path.abspath(binary), "--serve"], env)]
    python = torch_python(args.python)
    if python:
        peers.append(Peer("pytorch", [python, os.path.join(HERE, "torch_peer.py")], env))
    else:
        print("no Python with torch + transformers found: project side only", file=sys.stderr)
    workloads = [w for w in peers[0].ask("list").split() if args.only in w]
    if "sgemm-2048" not in workloads:
        workloads.append("sgemm-2048")
    workloads.remove("sgemm-2048")
    workloads.insert(0, "sgemm-2048")

    results = {}
    try:
        for workload in workloads:
            times = {p.label: [] for p in peers}
            for rep in range(args.reps):
                order = peers if rep % 2 == 0 else list(reversed(peers))
                for peer in order:
                    # Let the other side's worker threads stop spinning first (OpenMP keeps
                    # them busy-waiting for a while after each parallel region).
                    time.sleep(args.pause)
                    times[peer.label].append(peer.time(workload))
            results[workload] = times
            print(f"  {workload}: " + ", ".join(
                f"{label} {statistics.median(ts):.4f} s" for label, ts in times.items()),
                file=sys.stderr)
    finally:
        for peer in peers:
            peer.close()

    peak = max(flops("sgemm-2048") / statistics.median(ts)
               for ts in results["sgemm-2048"].values()) / 1e9
    end_load = os.getloadavg()[0]
    where = f"{args.device} ({gpu_model()}), " if on_gpu else ""
    print(f"# project vs PyTorch, {datetime.date.today()}, {where}{platform.machine()} "
          f"{os.cpu_count()} CPUs ({cpu_model()}), load average {load:.2f} at start, "
          f"{end_load:.2f} at end; medians of {args.reps} interleaved repetitions "
          f"({args.pause} s idle before each), "
          f"spread = min-max; sgemm peak {peak:.0f} GFLOP/s (best of both at 2048^3, fp32)")
    print()
    print("| workload | project s | spread | PyTorch s | spread | PyTorch/project | project GFLOP/s | % of peak |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for workload, times in results.items():
        ours = describe(times["project"])
        gflops = flops(workload) / ours[0] / 1e9
        if "pytorch" in times:
            theirs = describe(times["pytorch"])
            peer = f"{theirs[0]:.4f} | {theirs[1]:.4f}-{theirs[2]:.4f} | {theirs[0] / ours[0]:.2f}x"
        else:
            peer = "n/a | n/a | n/a"
        print(f"| {workload} | {ours[0]:.4f} | {ours[1]:.4f}-{ours[2]:.4f} | {peer} | "
              f"{gflops:.1f} | {100 * gflops / peak:.0f} % |")
    if not args.no_server:
        # ScorePairs over gRPC at concurrency 1/8/32 (p50/p99): the project's own server, which
        # has no PyTorch counterpart; load-client prints its table.
        load_client = [os.path.abspath(args.load_client)] if args.load_client else [
            "cargo", "run", "--quiet", "--release", "-p", "model-server", "--bin", "load-client",
            "--"]
        preset = ["--preset", "gpt2", "--device", args.device] if on_gpu else [
            "--preset", "tiny-gpt2"]
        out = subprocess.run(
            load_client + preset + ["--tokens", "64", "--requests", "256", "--reps", "3"],
            cwd=ROOT, check=True, capture_output=True, text=True).stdout
        print()
        print("Server round trips (project only: single-pair ScorePairs over loopback gRPC, "
              f"{preset[1]} preset on {args.device}, load-client):")
        print()
        print(out.strip())
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"date": str(datetime.date.today()), "load_start": load,
                       "load_end": end_load, "peak_gflops": peak, "reps": args.reps,
                       "results": results}, f, indent=1)


def gpu_model():
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
                              capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown GPU"


def cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


if __name__ == "__main__":
    main()
