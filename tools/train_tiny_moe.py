#!/usr/bin/env python3
"""Train a small Qwen3-MoE on CPU (transformers) from text already on this disk, and cache it.

Why: synthetic experts do not have trained experts' spectra, and a solver tuned on them lost to the
paper's code on trained weights. This makes a checkpoint with trained experts in minutes, offline:
the text is the Python standard library's own sources, the tokenizer a byte-level BPE trained on
it (tokenizers), the model transformers' Qwen3MoeForCausalLM. The result is a normal hub-layout
checkpoint (per-expert names, model.safetensors.index.json, tokenizer.json) that every tool of this
project (and the reference's train.py) reads.

The recipe (shapes, steps, seed, text) is hashed into recipe.json; a second call with the same
recipe returns the cached directory at once. Deterministic for a given torch build and thread count.

    python tools/train_tiny_moe.py                    # -> ~/.cache/mobe-stream/trained-qwen3-moe-<hash>
    python tools/bench_solver.py --checkpoint "$(python tools/train_tiny_moe.py --print-path)"
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import random
import sys
import sysconfig
import time
from pathlib import Path

import torch

DEFAULTS = {"layers": 4, "experts": 32, "top_k": 4, "hidden": 256, "moe_inter": 96, "heads": 4, "kv_heads": 2,
            "vocab": 1024, "seq": 256, "batch": 16, "steps": 900, "lr": 3e-3, "seed": 0, "text_bytes": 8_000_000}


def cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "mobe-stream"


def recipe_hash(recipe: dict) -> str:
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:12]


def cached_path(recipe: dict) -> Path:
    """Where a recipe's model is cached (trained or not yet)."""
    return cache_root() / f"trained-qwen3-moe-{recipe_hash(recipe)}"


def stdlib_text(limit: int) -> str:
    """The standard library's .py files in a fixed order, up to `limit` bytes (no network)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    parts, total = [], 0
    for f in sorted(root.rglob("*.py")):
        if "site-packages" in f.parts or "test" in f.parts:
            continue
        try:
            t = f.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        parts.append(t)
        total += len(t)
        if total >= limit:
            break
    return "\n".join(parts)[:limit]


def train_tokenizer(text: str, vocab: int, out: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<|bos|>", "<|eos|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(text.splitlines(), trainer=trainer)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(
        '{"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>", '
        '"unk_token": "<unk>", "model_max_length": 1024}\n')
    return tok


def model_config(r: dict):
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(vocab_size=r["vocab"], hidden_size=r["hidden"], intermediate_size=2 * r["hidden"],
                          moe_intermediate_size=r["moe_inter"], num_hidden_layers=r["layers"],
                          num_attention_heads=r["heads"], num_key_value_heads=r["kv_heads"],
                          head_dim=r["hidden"] // r["heads"], num_experts=r["experts"],
                          num_experts_per_tok=r["top_k"], norm_topk_prob=True, decoder_sparse_step=1,
                          mlp_only_layers=[], max_position_embeddings=2 * r["seq"], output_router_logits=True,
                          router_aux_loss_coef=0.01, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)


def write_index(out: Path) -> None:
    """model.safetensors.index.json for a single-file save (the reference's train.py needs one)."""
    if (out / "model.safetensors.index.json").exists():
        return
    from safetensors import safe_open

    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        names = list(f.keys())
    index = {"metadata": {"total_size": (out / "model.safetensors").stat().st_size},
             "weight_map": {n: "model.safetensors" for n in sorted(names)}}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1) + "\n")


def train(recipe: dict, out: Path, threads: int) -> None:
    from transformers import Qwen3MoeForCausalLM

    torch.manual_seed(recipe["seed"])
    random.seed(recipe["seed"])
    tmp = out.with_name(out.name + ".partial")
    tmp.mkdir(parents=True, exist_ok=True)
    text = stdlib_text(recipe["text_bytes"])
    tok = train_tokenizer(text, recipe["vocab"], tmp)
    ids = torch.tensor(tok.encode(text).ids, dtype=torch.long)
    print(f"text {len(text) / 1e6:.1f} MB -> {ids.numel() / 1e6:.2f} M tokens; threads {threads}", flush=True)
    model = Qwen3MoeForCausalLM(model_config(recipe))
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=recipe["lr"], betas=(0.9, 0.95), weight_decay=0.1)
    S, Bt, steps = recipe["seq"], recipe["batch"], recipe["steps"]
    g = torch.Generator().manual_seed(recipe["seed"])
    t0 = time.perf_counter()
    for step in range(1, steps + 1):
        lr = recipe["lr"] * min(1.0, step / 50) * 0.5 * (1 + math.cos(math.pi * step / steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, ids.numel() - S - 1, (Bt,), generator=g)
        x = torch.stack([ids[s:s + S] for s in starts.tolist()])
        outp = model(input_ids=x, labels=x)
        opt.zero_grad(set_to_none=True)
        outp.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 20 == 0 or step == steps:
            dt = time.perf_counter() - t0
            print(f"step {step}/{steps} loss {float(outp.loss.detach()):.3f} ({dt:.0f}s, eta {dt / step * (steps - step):.0f}s)",
                  flush=True)
    model.config.output_router_logits = False
    model.to(torch.bfloat16)  # what released checkpoints store
    model.save_pretrained(str(tmp), safe_serialization=True)
    write_index(tmp)
    (tmp / "recipe.json").write_text(json.dumps({**recipe, "params": n_params, "train_seconds": time.perf_counter() - t0,
                                                 "torch": torch.__version__, "threads": threads}, indent=1) + "\n")
    os.replace(tmp, out)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for k, v in DEFAULTS.items():
        ap.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    ap.add_argument("--out", type=Path, default=None, help="default: a recipe-named directory under the cache")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--print-path", action="store_true", help="only print where the recipe's model is (or would be)")
    args = ap.parse_args()
    recipe = {k: getattr(args, k) for k in DEFAULTS}
    out = args.out or cached_path(recipe)
    if args.print_path:
        print(out)
        return
    if (out / "recipe.json").exists():
        print(out)
        return
    torch.set_num_threads(args.threads)
    train(recipe, out, args.threads)
    print(out)


if __name__ == "__main__":
    sys.exit(main())
