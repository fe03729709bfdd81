#!/usr/bin/env python
"""Generation speed and peak memory: in-memory / cpu-offload / disk-offload plans, original vs MoBE
form, and (when accelerate is installed) transformers device_map="auto" with the same max_memory.

Each configuration runs in its own subprocess so that peak RSS is its own. Also a micro-benchmark
of MoBE basis mixing: routed experts only vs all experts (what the reference code does).
`--side-by-side`: prefill and decode tokens/s and peak memory of original, MoBE (cache off and
`auto`) and export on the trained tiny model and a Kimi-K2 layer scaled down (tools/bench_forms.py).

    python tools/bench_generate.py --side-by-side [--dtype bfloat16] [--json out.json]
    python tools/bench_generate.py [--family qwen3_moe] [--tokens 32] [--json out.json]
    python tools/bench_generate.py --family kimi_k2 --fp8    # FP8 block-scaled source (bf16 rest)
    python tools/bench_generate.py --family kimi_k2 --fp8 --expert-plans   # + --device-map experts rows
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PROMPT = "The quick brown fox jumps over the lazy dog. Experts of a layer"


def make_mobe(src: Path, out: Path, bases: int = 8, rank: int | None = None, seed: int = 0) -> Path:
    """A MoBE checkpoint with random factors (speed only: quality is irrelevant here)."""
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    cfg = json.loads((src / "config.json").read_text())
    sd = {}
    for f in sorted(src.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    E = cfg.get("n_routed_experts") or cfg.get("num_experts")
    p, d = cfg["moe_intermediate_size"], cfg["hidden_size"]
    r = rank or p
    layers = sorted({int(k.split(".")[2]) for k in sd if ".mlp.experts." in k})
    for i in layers:
        pre = f"model.layers.{i}.mlp.experts."
        for proj in ("gate_proj", "up_proj"):
            for e in range(E):
                sd.pop(f"{pre}{e}.{proj}.weight")
            sd[pre + proj + ".mobe_A"] = (torch.randn(E, p, r, generator=g) * 0.05).to(torch.bfloat16)
            sd[pre + proj + ".mobe_B"] = (torch.randn(1, bases, r, d, generator=g) * 0.05).to(torch.bfloat16)
            sd[pre + proj + ".mobe_alpha"] = torch.randn(E, bases, generator=g)
    cfg["mobe"] = {"format_version": 1, "method": "mobe", "num_bases": bases, "rank": r, "groups": 1,
                   "activation": "silu", "projections": ["gate_proj", "up_proj"], "layers": layers,
                   "layout": "per_expert", "dtype": "bfloat16", "source_family": cfg["model_type"]}
    out.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    for f in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        shutil.copy(src / f, out / f)
    return out


def run_one(args) -> dict:
    """One configuration, in this (fresh) process."""
    from mobe_stream.runtime.generate import peak_rss_bytes

    if args.engine == "transformers":
        import transformers

        kw = {}
        if args.plan != "memory":
            kw = dict(device_map="auto", max_memory=_hf_max_memory(args.max_memory), offload_folder=args.offload)
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=args.dtype, **kw).eval()
        tok = transformers.AutoTokenizer.from_pretrained(args.model)
        ids = tok(PROMPT, return_tensors="pt").input_ids

        def timed(n: int) -> float:
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
            return time.perf_counter() - t0

        timed(2)  # warm-up
        best = min(timed(args.tokens) for _ in range(3))  # end to end: prefill + N tokens
        return {"tokens": args.tokens, "tok_s": args.tokens / best, "peak_rss": peak_rss_bytes()}
    from mobe_stream.runtime.generate import generate
    from mobe_stream.runtime.model import load_model
    from mobe_stream.runtime.tokenizer import Tokenizer

    kw = {} if args.plan == "memory" else dict(device_map="auto", max_memory=args.max_memory, offload_folder=args.offload)
    if args.plan.startswith("experts"):
        kw = _experts_kw(args)
    m = load_model(args.model, dtype=args.dtype, materialize_all=args.materialize_all, **kw)
    tok = Tokenizer(args.model)
    tok.eos_ids = set()  # fixed length runs
    generate(m, tok, PROMPT, 2, stream=None)  # warm-up
    runs = [generate(m, tok, PROMPT, args.tokens, stream=None) for _ in range(3)]
    r = min(runs, key=lambda x: x.prefill_s + x.decode_s)  # end to end, as for transformers
    placed = {str(v) for v in m.plan.values()}
    ec = r.expert_cache
    m.close()
    written = sum(f.stat().st_size for f in Path(args.offload).rglob("*") if f.is_file()) if args.offload else 0
    return {"offload_written": written, "tokens": r.new_tokens, "tok_s": r.new_tokens / (r.prefill_s + r.decode_s),
            "peak_rss": r.peak_rss_bytes, "devices": sorted(placed),
            "mixed_bases": m.mobe_mixed, "expert_hit_rate": ec["hit_rate"] if ec else None}


def _experts_kw(args) -> dict:
    """--device-map experts: "experts" = experts in RAM, default cache; "experts-disk" = RAM holds only
    the resident part plus a cache of a quarter of the expert bytes, the experts stay in the shards."""
    if args.plan == "experts":
        return dict(device_map="experts", max_memory=args.max_memory)
    from mobe_stream.checkpoint.reader import CheckpointReader
    from mobe_stream.runtime.config import parse_config
    from mobe_stream.runtime.model import plan_model, resolve_dtype

    with CheckpointReader(args.model) as r:
        plan, sizes = plan_model(r, parse_config(r.config, r.config_path), resolve_dtype(args.dtype), "experts",
                                 "cpu=64GiB", expert_cache=0)
    experts = sum(b for k, b in sizes.items() if k.endswith(".experts"))
    resident = sum(b for k, b in sizes.items() if not k.endswith(".experts"))
    cache = experts // 4
    return dict(device_map="experts", max_memory=f"cpu={resident + cache},disk", expert_cache=cache)


def _hf_max_memory(s: str) -> dict:
    from mobe_stream.runtime.device_map import parse_max_memory

    return {k: ("1000GiB" if v == float("inf") else int(v)) for k, v in parse_max_memory(s).items() if k != "disk"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default="qwen3_moe")
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--json", dest="json_out", default=None)
    ap.add_argument("--fp8", action="store_true", help="FP8 block-scaled source (deepseek_v3 / kimi_k2 only)")
    ap.add_argument("--forms", default="original,mobe", help="which checkpoints to run (original, mobe)")
    ap.add_argument("--dtype", default=None, choices=["float32", "bfloat16"],
                    help="compute dtype (default: float32 for the plans, bfloat16 for --side-by-side)")
    ap.add_argument("--expert-plans", action="store_true",
                    help="also --device-map experts (experts in RAM; on disk with a 25%% cache)")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--engine", default="mobe", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--plan", default="memory", help=argparse.SUPPRESS)
    ap.add_argument("--max-memory", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--offload", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--materialize-all", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--side-by-side", action="store_true", help="original / MoBE / export, prefill and decode")
    ap.add_argument("--reps", type=int, default=3, help="--side-by-side: interleaved repetitions (median)")
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    if args.side_by_side:
        from bench_forms import speed

        res = speed(argparse.Namespace(shapes="trained,kimi", dtype=args.dtype or "bfloat16",
                                       ctx=256, tokens=args.tokens, reps=args.reps))
        if args.json_out:
            Path(args.json_out).write_text(json.dumps(res, indent=1))
        return
    args.dtype = args.dtype or "float32"

    from mobe_stream.synth import make_tiny_moe

    work = Path(tempfile.mkdtemp(prefix="bench-gen-"))
    src = make_tiny_moe(work / "orig", args.family, fp8=args.fp8, dtype=torch.bfloat16 if args.fp8 else torch.float32,
                        num_layers=args.layers,
                        num_experts=args.experts, hidden_size=args.hidden, moe_intermediate_size=args.hidden // 2,
                        num_shards=2, vocab_size=512)
    mobe = make_mobe(src, work / "mobe")
    try:
        import accelerate  # noqa: F401
        have_accelerate = True
    except ImportError:
        have_accelerate = False
    plans = {"memory": None, "cpu-offload": "cpu=64GiB", "disk-offload": "cpu=1,disk"}
    if args.expert_plans:
        plans.update({"experts": "cpu=64GiB", "experts-disk": None})
    rows = []
    for form, path in (("original", src), ("mobe", mobe)):
        if form not in args.forms.split(","):
            continue
        for plan, mm in plans.items():
            variants = [("mobe-stream", False)] + ([("mobe-stream all-E", True)] if form == "mobe" and plan == "memory" else [])
            for engine, mat in variants:
                rows.append(_sub(engine, form, plan, path, mm, work, args.tokens, mat, args.dtype))
            if have_accelerate and form == "original" and not plan.startswith("experts"):
                rows.append(_sub("transformers+accelerate", form, plan, path, mm, work, args.tokens, False, args.dtype))
    if not have_accelerate:
        rows.append({"engine": "transformers+accelerate", "form": "original", "plan": "-", "note": "accelerate not installed"})
    from bench_forms import mixing as bench_mixing

    mixing = bench_mixing(argparse.Namespace(dtype=args.dtype))
    print(f"\n{'engine':<24} {'form':<9} {'plan':<13} {'tok/s':>8} {'peak RSS':>10} {'offload written':>16} "
          f"{'hit rate':>9}  devices")
    for r in rows:
        if "note" in r:
            print(f"{r['engine']:<24} {r['form']:<9} {r['plan']:<13} {r['note']}")
            continue
        print(f"{r['engine']:<24} {r['form']:<9} {r['plan']:<13} {r['tok_s']:8.1f} {r['peak_rss'] / 2**20:8.1f}Mi "
              f"{r.get('offload_written', 0) / 2**20:14.1f}Mi "
              f"{'' if r.get('expert_hit_rate') is None else format(r['expert_hit_rate'], '.2f'):>9}  "
              f"{','.join(r.get('devices', []))}")
    if args.json_out:
        Path(args.json_out).write_text(json.dumps({"rows": rows, "mixing": mixing}, indent=1))
    shutil.rmtree(work, ignore_errors=True)


def _sub(engine, form, plan, path, mm, work, tokens, mat, dtype) -> dict:
    cmd = [sys.executable, __file__, "--one", "--engine", "transformers" if engine.startswith("transformers") else "mobe",
           "--model", str(path), "--plan", plan, "--tokens", str(tokens), "--offload", str(work / f"off-{engine}-{form}-{plan}"),
           "--dtype", dtype]
    if mm:
        cmd += ["--max-memory", mm]
    if mat:
        cmd.append("--materialize-all")
    res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    row = {"engine": engine, "form": form, "plan": plan}
    if res.returncode != 0:
        row["note"] = "failed: " + (res.stderr.strip().splitlines() or ["?"])[-1][:80]
        return row
    row.update(json.loads(res.stdout.strip().splitlines()[-1]))
    return row


if __name__ == "__main__":
    main()
