#!/usr/bin/env python3
"""Modelled speed-up of a study spread over N model servers (trainer/src/study/pool.rs), from the
run dependency graph: per (seed, scenario), every ceiling (phase 1), then every student and
bootstrapping chain (phase 2, a chain's runs in order), handed out in the trainer's queue order
to whichever server is free. A run's cost is taken proportional to the parameters of the model
it trains (same data and epochs within a scenario; SimPO/DPO's SFT stage scales alike), so the
numbers are shapes, not timings: they say how much of N GPUs the graph can use.

    python3 tools/pool_model.py                 # the paper's GPT-2 and OPT grids, N = 1..16
"""

import heapq

PARAMS = {  # millions
    "gpt2": 124, "gpt2-medium": 355, "gpt2-large": 774, "gpt2-xl": 1558,
    "opt-125m": 125, "opt-350m": 331, "opt-1.3b": 1316, "opt-2.7b": 2652, "opt-6.7b": 6658,
}

GRIDS = {
    "GPT-2 (4 sizes)": ["gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"],
    "OPT (5 sizes)": ["opt-125m", "opt-350m", "opt-1.3b", "opt-2.7b", "opt-6.7b"],
}


def phases(models, scenarios=("reward", "simpo", "dpo"), conflicts=3, seeds=1, chain=None):
    """Task costs per phase, in the trainer's order (study/mod.rs run_all)."""
    out = []
    for _ in range(seeds):
        for scenario in scenarios:
            out.append([PARAMS[m] for m in models])
            tasks = []
            if scenario != "reward" and chain:
                weak, mid, strong = chain
                tasks.append(PARAMS[mid] + conflicts * PARAMS[strong])
            for i, _weak in enumerate(models):
                for strong in models[i + 1:]:
                    tasks.extend([PARAMS[strong]] * conflicts)
            out.append(tasks)
    return out


def makespan(tasks, servers):
    free = [0.0] * servers
    heapq.heapify(free)
    end = 0.0
    for cost in tasks:  # queue order, next free server
        start = heapq.heappop(free)
        heapq.heappush(free, start + cost)
        end = max(end, start + cost)
    return end


def main():
    counts = [1, 2, 4, 8, 16]
    print("| grid | runs | " + " | ".join(f"N={n}" for n in counts) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in counts) + " |")
    for name, models in GRIDS.items():
        chain = (models[0], models[len(models) // 2], models[-1])
        ps = phases(models, chain=chain)
        runs = sum(len(p) for p in ps) + 2 * 3  # a chain task holds 1 + conflicts runs
        serial = sum(sum(p) for p in ps)
        cells = []
        for n in counts:
            total = sum(makespan(p, n) for p in ps)
            cells.append(f"{serial / total:.2f}x")
        print(f"| {name} | {runs} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
