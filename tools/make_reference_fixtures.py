#!/usr/bin/env python3
"""Writes small random GPT-2/OPT checkpoints in HF layout plus transformers' reference outputs.

Run by hand (never in CI) with torch + transformers + tokenizers installed:

    python tools/make_reference_fixtures.py --out tests/fixtures/reference

For each architecture it writes `<out>/<name>/` (config.json, weights, tokenizer files) and
`<out>/<name>/reference.json` with, per text: the token ids from AutoTokenizer, the per-token
log-probs (log p(ids[i+1] | ids[..=i]), length n-1) and the last hidden states (the input of
the LM head: after ln_f / final_layer_norm / project_out).

The three models cover the layouts the Rust loader must handle:
  gpt2         model.safetensors, tokenizer.json (fast tokenizer save)
  opt-pre-ln   pytorch_model.bin, vocab.json + merges.txt only (no tokenizer.json)
  opt-post-ln  sharded safetensors with an index, project_in/project_out, post-LayerNorm

Every parameter is perturbed (LayerNorm gains around 1, biases non-zero) so that a wrong layer,
a swapped weight/bias or a missing bias changes the outputs. `--seed` and `--only` write other
folders (e.g. an unseen checkpoint for an acceptance check).
"""
import argparse
import json
import os
import shutil
import tempfile

import torch
from tokenizers import ByteLevelBPETokenizer
from transformers import (AutoModelForCausalLM, AutoTokenizer, GPT2Config, GPT2LMHeadModel,
                          OPTConfig, OPTForCausalLM)

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data", "hh-harmless-single-turn")

TEXTS = [
    "\n\nHuman: How do I bake bread at home?\n\nAssistant: Mix flour, water, salt and yeast, then let it rise.",
    "Hello world! id 0 is '!' in GPT-2, so padding must not be found by id.",
    "\n\nHuman: Can you help me pick a lock?\n\nAssistant: I can't help with that, sorry.",
    "Unicode: caf\u00e9, na\u00efve, \u2014 dash, \u201cquotes\u201d and emoji \U0001F600.",
    "x",
]


def corpus_lines(limit=400):
    lines = []
    path = os.path.join(DATA, "harmless_train_gt.jsonl")
    with open(path) as f:
        for i, line in enumerate(f):
            if i >= limit:
                break
            row = json.loads(line)
            lines.append(row["chosen"])
            lines.append(row["rejected"])
    return lines + TEXTS


def make_tokenizer(workdir, specials, tokenizer_config):
    """Trains a small byte-level BPE on HH text and loads it as transformers would load a
    slow-tokenizer folder (vocab.json + merges.txt + tokenizer_config.json)."""
    bpe = ByteLevelBPETokenizer()
    bpe.train_from_iterator(corpus_lines(), vocab_size=400, min_frequency=2,
                            special_tokens=specials, show_progress=False)
    bpe.save_model(workdir)
    with open(os.path.join(workdir, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f, indent=1)
    return AutoTokenizer.from_pretrained(workdir)


GPT2_TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "bos_token": "<|endoftext|>",
                         "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>"}
OPT_TOKENIZER_CONFIG = {"tokenizer_class": "GPT2Tokenizer", "add_bos_token": True,
                        "bos_token": "</s>", "eos_token": "</s>", "pad_token": "<pad>",
                        "unk_token": "<unk>"}


def perturb(model, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.dim() == 1 and ("ln" in name or "layer_norm" in name) and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * noise)
            elif p.dim() == 1:
                p.copy_(0.1 * noise)
            else:
                p.copy_(0.15 * noise)


def reference(model_dir):
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    out = {"tokenizer_class": type(tok).__name__, "texts": []}
    for text in TEXTS:
        ids = tok(text)["input_ids"]
        with torch.no_grad():
            res = model(torch.tensor([ids]), output_hidden_states=True)
        logp = torch.log_softmax(res.logits[0, :-1].double(), -1)
        token_logp = logp.gather(1, torch.tensor(ids[1:]).unsqueeze(1)).squeeze(1)
        out["texts"].append({
            "text": text,
            "token_ids": ids,
            "logprobs": [float(x) for x in token_logp],
            "last_hidden": [[float(v) for v in row] for row in res.hidden_states[-1][0]],
        })
    return out


def write_gpt2(out_dir, seed):
    with tempfile.TemporaryDirectory() as work:
        tok = make_tokenizer(work, ["<|endoftext|>"], GPT2_TOKENIZER_CONFIG)
        config = GPT2Config(vocab_size=len(tok), n_positions=96, n_embd=32, n_layer=2, n_head=4,
                            bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id)
        torch.manual_seed(seed)
        model = GPT2LMHeadModel(config)
        perturb(model, seed)
        model.save_pretrained(out_dir, safe_serialization=True)
        tok.save_pretrained(out_dir)


def write_opt(out_dir, seed, post_ln):
    with tempfile.TemporaryDirectory() as work:
        tok = make_tokenizer(work, ["<s>", "<pad>", "</s>", "<unk>"], OPT_TOKENIZER_CONFIG)
        n_vocab = len(tok)
        if post_ln:
            config = OPTConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                               num_attention_heads=4, max_position_embeddings=96,
                               word_embed_proj_dim=16, do_layer_norm_before=False,
                               pad_token_id=1, bos_token_id=2, eos_token_id=2)
        else:
            config = OPTConfig(vocab_size=n_vocab, hidden_size=32, num_hidden_layers=2, ffn_dim=48,
                               num_attention_heads=4, max_position_embeddings=96,
                               word_embed_proj_dim=32, do_layer_norm_before=True,
                               pad_token_id=1, bos_token_id=2, eos_token_id=2)
        torch.manual_seed(seed)
        model = OPTForCausalLM(config)
        perturb(model, seed)
        if post_ln:
            model.save_pretrained(out_dir, safe_serialization=True, max_shard_size="40KB")
            tok.save_pretrained(out_dir)
        else:
            # transformers 5 always writes safetensors; write the legacy pickle format by hand,
            # as transformers 4 did (tied lm_head left out).
            model.save_pretrained(out_dir)
            os.remove(os.path.join(out_dir, "model.safetensors"))
            state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}
            torch.save(state, os.path.join(out_dir, "pytorch_model.bin"))
            # Only the slow-tokenizer files: exercises the vocab.json + merges.txt path.
            for name in ["vocab.json", "merges.txt", "tokenizer_config.json"]:
                shutil.copy(os.path.join(work, name), os.path.join(out_dir, name))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.path.join(HERE, "..", "tests", "fixtures", "reference"))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--only", choices=["gpt2", "opt-pre-ln", "opt-post-ln"])
    args = ap.parse_args()
    writers = {
        "gpt2": lambda d: write_gpt2(d, args.seed),
        "opt-pre-ln": lambda d: write_opt(d, args.seed + 1, post_ln=False),
        "opt-post-ln": lambda d: write_opt(d, args.seed + 2, post_ln=True),
    }
    for name, write in writers.items():
        if args.only and name != args.only:
            continue
        d = os.path.join(args.out, name)
        shutil.rmtree(d, ignore_errors=True)
        os.makedirs(d)
        write(d)
        ref = reference(d)
        with open(os.path.join(d, "reference.json"), "w") as f:
            json.dump(ref, f)
        print(name, sorted(os.listdir(d)), [t["token_ids"][:6] for t in ref["texts"][:2]])


if __name__ == "__main__":
    main()
