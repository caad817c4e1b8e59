#!/usr/bin/env python3
"""Compares `eval-client logprobs` with transformers on any HF folder (run by hand; needs torch
and transformers). Exit status 0 when token ids are identical and max |delta log-prob| <= tol.

    python tools/compare_logprobs.py --model DIR --text "Hello" [--eval-client PATH] [--tol 1e-4]
"""
import argparse
import json
import os
import subprocess
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

HERE = os.path.dirname(os.path.abspath(__file__))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--text", required=True)
    ap.add_argument("--eval-client", default=os.path.join(HERE, "..", "target", "release", "eval-client"))
    ap.add_argument("--tol", type=float, default=1e-4)
    args = ap.parse_args()

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    ids = tok(args.text)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0].double()
    ref = torch.log_softmax(logits[:-1], -1).gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)

    out = subprocess.run([args.eval_client, "logprobs", "--model", args.model, "--text", args.text],
                         check=True, capture_output=True, text=True).stdout
    ours = json.loads(out)
    same_ids = ours["token_ids"] == ids
    diff = max((abs(a - b) for a, b in zip(ours["logprobs"], ref.tolist())), default=0.0)
    ok = same_ids and len(ours["logprobs"]) == len(ids) - 1 and diff <= args.tol
    print(json.dumps({"model": args.model, "tokens": len(ids), "ids_identical": same_ids,
                      "max_abs_logprob_diff": diff, "ok": ok}))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
