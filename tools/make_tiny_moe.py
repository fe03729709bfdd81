#!/usr/bin/env python
"""Write a tiny (or Kimi-shaped wide) synthetic MoE checkpoint: `python tools/make_tiny_moe.py OUT --family deepseek_v3 --fp8`,
or a released model's exact layout with hole-only data: `python tools/make_tiny_moe.py OUT --true-shape kimi_k2 --sparse`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # works from a fresh clone without installing

import torch

from mobe_stream.synth import FAMILIES, TOKENIZERS, make_tiny_moe, make_wide_kimi
from mobe_stream.synth.true_shape import TRUE_SHAPES, make_true_shape


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("out_dir")
    ap.add_argument("--family", choices=FAMILIES, default="qwen3_moe")
    ap.add_argument("--fp8", action="store_true", help="block-scaled FP8 (deepseek_v3 / kimi_k2)")
    ap.add_argument("--mxfp4", action="store_true", help="MXFP4 experts, _blocks/_scales as released (gpt_oss)")
    ap.add_argument("--multimodal", action="store_true",
                    help="Llama-4 as released: Llama4ForConditionalGeneration, text model under language_model. (llama4)")
    ap.add_argument("--layout", choices=("per_expert", "fused"), default="per_expert")
    ap.add_argument("--wide", action="store_true", help="Kimi-K2 shape: 61 layers, 384 experts, tiny dims")
    ap.add_argument("--unstructured", action="store_true", help="iid experts instead of shared structure")
    ap.add_argument("--num-layers", type=int)
    ap.add_argument("--num-experts", type=int)
    ap.add_argument("--hidden-size", type=int)
    ap.add_argument("--moe-intermediate-size", type=int)
    ap.add_argument("--vocab-size", type=int)
    ap.add_argument("--num-shards", type=int)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16")
    ap.add_argument("--mtp-layer", action="store_true", help="add DeepSeek's MTP layer past num_hidden_layers")
    ap.add_argument("--tokenizer", choices=TOKENIZERS, default="tokenizers",
                    help="tiktoken: Kimi-K2's layout (tiktoken.model + chat template, no tokenizer.json)")
    ap.add_argument("--true-shape", choices=tuple(TRUE_SHAPES),
                    help="the released model's config, tensor names, shapes, dtypes and shards (needs --sparse)")
    ap.add_argument("--sparse", action="store_true", help="with --true-shape: data regions are holes (a few MB on disk)")
    a = ap.parse_args(argv)
    if a.true_shape:
        if not a.sparse:
            ap.error("--true-shape writes ~0.5-1 TB of data regions: pass --sparse to leave them as holes")
        out = make_true_shape(a.out_dir, a.true_shape, sparse=True)
    elif a.wide:
        kw = {k: v for k, v in dict(num_layers=a.num_layers, num_experts=a.num_experts, hidden_size=a.hidden_size,
                                    moe_intermediate_size=a.moe_intermediate_size, num_shards=a.num_shards).items()
              if v is not None}
        out = make_wide_kimi(a.out_dir, fp8=a.fp8, seed=a.seed, **kw)
    else:
        out = make_tiny_moe(a.out_dir, a.family, fp8=a.fp8, mxfp4=a.mxfp4, layout=a.layout, structured=not a.unstructured,
                            num_layers=a.num_layers, num_experts=a.num_experts, hidden_size=a.hidden_size,
                            moe_intermediate_size=a.moe_intermediate_size, num_shards=a.num_shards or 3, seed=a.seed,
                            dtype=getattr(torch, a.dtype), vocab_size=a.vocab_size, mtp_layer=a.mtp_layer,
                            tokenizer=a.tokenizer, multimodal=a.multimodal)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
