"""PyTorch + transformers side of the comparison (tools/bench/compare.py): the same workloads
as the project's `workloads` bench (model-server/training/benches/workloads.rs), one timed
repetition per request.

Protocol (stdin/stdout, one line each): a workload name (the project's bench owns the list,
`list` there; this side builds any name of that form) answers the seconds of one repetition (the first request builds the model and runs one untimed
warm-up); `quit` ends. `BENCH_DEVICE=cuda:0` runs on a GPU (each repetition ends with a
synchronisation). Never run in CI: it needs torch and transformers (see README of
tools/bench).
"""

import os
import sys
import time

import torch
import torch.nn.functional as F
from transformers import GPT2Config, GPT2LMHeadModel, GPT2Model

DEVICE = torch.device(os.environ.get("BENCH_DEVICE", "cpu"))


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def config_for(shape):
    no_dropout = dict(resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    if shape == "gpt2s":
        return GPT2Config(**no_dropout)
    width = {"w32": 32, "w64": 64}[shape]
    return GPT2Config(vocab_size=768, n_positions=96, n_embd=width, n_layer=2, n_head=4,
                      bos_token_id=767, eos_token_id=767, **no_dropout)


def token_logprobs(model, ids):
    logits = model(ids).logits[:, :-1]
    return torch.gather(F.log_softmax(logits, -1), 2, ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def build(name):
    torch.manual_seed(1)
    shape, rest = name.split("-", 1)
    if shape == "sgemm":
        n = int(rest)
        a, b = torch.randn(n, n, device=DEVICE), torch.randn(n, n, device=DEVICE)
        return lambda: torch.mm(a, b)
    kind, dims = rest.rsplit("-", 1)
    dims = [int(d) for d in dims.split("x")]
    pairs, length = dims[-2], dims[-1]
    config = config_for(shape)
    vocab = config.vocab_size - 1
    g = torch.Generator().manual_seed(7)
    rand_ids = lambda n: torch.randint(0, vocab, (n, length), generator=g).to(DEVICE)

    if kind in ("lm-forward", "logprobs"):
        model = GPT2LMHeadModel(config).to(DEVICE).eval()
        ids = rand_ids(pairs)

        def run():
            with torch.no_grad():
                token_logprobs(model, ids).sum(1)
        return run

    if kind == "reward-forward":
        body = GPT2Model(config).to(DEVICE).eval()
        head = torch.nn.Linear(config.n_embd, 1, bias=False).to(DEVICE)
        ids = rand_ids(pairs)

        def run():
            with torch.no_grad():
                head(body(ids).last_hidden_state[:, -1]).squeeze(-1).tolist()
        return run

    if kind == "reward-step":
        body = GPT2Model(config).to(DEVICE).train()
        head = torch.nn.Linear(config.n_embd, 1, bias=False).to(DEVICE)
        params = list(body.parameters()) + list(head.parameters())
        opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.0)
        ids = rand_ids(2 * pairs)
        target = torch.ones(pairs, device=DEVICE)

        def run():
            rewards = head(body(ids).last_hidden_state[:, -1]).squeeze(-1).view(pairs, 2)
            loss = F.binary_cross_entropy_with_logits(rewards[:, 0] - rewards[:, 1], target)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return run

    model = GPT2LMHeadModel(config).to(DEVICE).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0)

    def step(loss):
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    if kind == "lm-step":
        ids = rand_ids(pairs)
        return lambda: step(model(ids, labels=ids).loss)

    if kind in ("simpo-step", "dpo-step"):
        ids = rand_ids(2 * pairs)
        half = length // 2
        mask = torch.zeros(2 * pairs, length - 1, device=DEVICE)
        mask[:, half - 1:] = 1.0  # log-probs of the response tokens

        def run():
            sums = (token_logprobs(model, ids) * mask).sum(1).view(pairs, 2)
            if kind == "simpo-step":
                means = sums / (length - half)
                loss = -F.logsigmoid(2.0 * (means[:, 0] - means[:, 1]) - 1.0).mean()
            else:
                reference = torch.tensor([-1.0, -1.2], device=DEVICE)
                margin = (sums[:, 0] - reference[0]) - (sums[:, 1] - reference[1])
                loss = -F.logsigmoid(0.1 * margin).mean()
            step(loss)
        return run

    raise ValueError(f"unknown workload {name}")


def main():
    torch.manual_seed(0)
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", os.cpu_count() or 1)))
    current = (None, None)
    for line in sys.stdin:
        request = line.strip()
        if not request:
            continue
        if request == "quit":
            break
        try:
            if current[0] != request:
                current = (None, None)
                run = build(request)
                run()
                synchronize()
                current = (request, run)
            start = time.perf_counter()
            current[1]()
            synchronize()
            answer = f"{time.perf_counter() - start:.6f}"
        except Exception as e:  # reported to the driver, which prints it
            answer = f"error {type(e).__name__}: {e}".replace("\n", " ")
        print(answer, flush=True)


if __name__ == "__main__":
    main()
