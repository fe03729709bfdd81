#!/usr/bin/env python
"""Speed of the compact MoBE form against the original and its export: prefill and decode tokens/s
and peak memory, side by side (issue: the compact form must run about as fast as the original).

Checkpoints are real pipeline outputs: `mobe-stream compress` (few steps: speed does not depend on
fit quality) and `mobe-stream export`. Shapes:
  trained  the trained tiny Qwen3-MoE of tools/train_tiny_moe.py when cached (32 experts, top-4,
           d 256, p 96, bf16), else the same shapes from the factory; MoBE m=8, r=p
  kimi     a Kimi-K2 layer scaled down by 16 (d 448, p 128, 96 experts top-8, FP8 block-scaled
           source, m=32 in 2 groups, r=p), 2 MoE layers
Every configuration runs in its own subprocess (its own peak RSS), `--reps` times interleaved with
the others; the median is reported. Prefill: forward of a `--ctx`-token window (what `eval` does
per window) and of one window of min(2048, max_position_embeddings) tokens (large: most experts
routed, many rows each). Decode: `generate` of `--tokens` tokens after a 32-token prompt. Forms:
original, mobe (no cache), mobe+cache (`--mobe-cache auto`, the default), mobe all-E (every expert
mixed and materialised per forward, as the reference code runs), export.

    python tools/bench_forms.py [--shapes trained,kimi] [--dtype bfloat16] [--json out.json]
    python tools/bench_forms.py --crossover      # factored vs materialised experts, by rows per expert
    python tools/bench_forms.py --mixing         # routed-only vs all-E mixing; chunked vs one pass
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

LARGE_CTX = 2048
FORMS = ("original", "mobe", "mobe+cache", "mobe all-E", "export")  # all-E: every expert mixed and
# materialised on every forward (the reference code's inference), the baseline for large batches


def _cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "mobe_stream", *args], check=True, capture_output=True, text=True)


def build(shape: str, work: Path) -> dict[str, Path]:
    """original, MoBE (compress output) and export checkpoints of one shape."""
    from mobe_stream.synth import make_tiny_moe

    src = work / f"{shape}-orig"
    if shape == "trained":
        sys.path.insert(0, str(ROOT / "tools"))
        from train_tiny_moe import DEFAULTS, cached_path

        trained = cached_path(dict(DEFAULTS))
        if (trained / "config.json").exists():
            src = trained
        else:
            make_tiny_moe(src, "qwen3_moe", num_layers=4, num_experts=32, hidden_size=256, moe_intermediate_size=96,
                          num_shards=1, vocab_size=1024)
            _set(src, num_experts_per_tok=4)
        bases = ["--num-bases", "8"]
    elif shape == "kimi":
        make_tiny_moe(src, "kimi_k2", fp8=True, num_layers=3, num_experts=96, hidden_size=448,
                      moe_intermediate_size=128, num_shards=2, vocab_size=1024)
        _set(src, num_experts_per_tok=8)
        bases = ["--num-bases", "32", "--groups", "2"]
    else:
        raise SystemExit(f"unknown shape {shape}")
    mobe, export = work / f"{shape}-mobe", work / f"{shape}-export"
    _cli("compress", str(src), "--out", str(mobe), "--steps", "5", *bases)
    _cli("export", str(mobe), "--out", str(export))
    return {"original": src, "mobe": mobe, "mobe+cache": mobe, "mobe all-E": mobe, "export": export}


def _set(model: Path, **keys) -> None:
    cfg = json.loads((model / "config.json").read_text())
    cfg.update(keys)
    (model / "config.json").write_text(json.dumps(cfg))


def run_one(args) -> dict:
    """One configuration in this (fresh) process."""
    from mobe_stream.runtime.generate import generate, peak_rss_bytes
    from mobe_stream.runtime.model import load_model
    from mobe_stream.runtime.tokenizer import Tokenizer

    torch.manual_seed(0)
    m = load_model(args.model, dtype=args.dtype, mobe_cache=args.mobe_cache, materialize_all=args.all_e)

    def prefill(ctx: int, reps: int = 3) -> float:
        toks = torch.randint(0, 1000, (1, ctx))
        m(toks)  # warm-up (and, with a cache, the first window's misses)
        t0 = time.perf_counter()
        for _ in range(reps):
            m(toks)
        return ctx * reps / (time.perf_counter() - t0)

    short = prefill(args.ctx)
    large = prefill(min(LARGE_CTX, m.cfg.max_position_embeddings), 1)  # most experts routed, many rows each
    toks = torch.randint(0, 1000, (1, args.ctx))
    tok = Tokenizer(args.model)
    tok.eos_ids = set()  # fixed-length runs
    prompt = toks[0, :32].tolist()
    generate(m, tok, prompt, 4, stream=None)
    r = generate(m, tok, prompt, args.tokens, stream=None)
    out = {"prefill_tok_s": short, "prefill_large_tok_s": large, "decode_tok_s": (r.new_tokens - 1) / r.decode_s,
           "peak_rss": peak_rss_bytes(),
           "peak_gpu": r.peak_gpu_bytes, "mobe_cache": m.mobe_cache_stats()}
    m.close()
    return out


def speed(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-forms-"))
    results: dict = {}
    for shape in args.shapes.split(","):
        paths = build(shape, work)
        runs: dict[str, list[dict]] = {f: [] for f in FORMS}
        for _ in range(args.reps):  # interleaved: a slow moment of the machine hits every form alike
            for form in FORMS:
                cmd = [sys.executable, __file__, "--one", "--model", str(paths[form]), "--dtype", args.dtype,
                       "--ctx", str(args.ctx), "--tokens", str(args.tokens),
                       "--mobe-cache", "auto" if form == "mobe+cache" else "0"] + (["--all-e"] if form == "mobe all-E" else [])
                res = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
                if res.returncode != 0:
                    raise SystemExit(f"{shape}/{form} failed: {res.stderr.strip()[-500:]}")
                runs[form].append(json.loads(res.stdout.strip().splitlines()[-1]))
        rows = {}
        for form, rs in runs.items():
            rows[form] = {k: statistics.median(r[k] for r in rs)
                          for k in ("prefill_tok_s", "prefill_large_tok_s", "decode_tok_s", "peak_rss")}
            rows[form]["mobe_cache"] = rs[-1]["mobe_cache"]
        results[shape] = rows
        base = rows["original"]
        print(f"\n{shape} ({args.dtype}, ctx {args.ctx}, {args.tokens} decode tokens, median of {args.reps})")
        print(f"{'form':<12} {'prefill tok/s':>14} {'x orig':>7} {'large prefill':>14} {'x orig':>7} "
              f"{'decode tok/s':>13} {'x orig':>7} {'peak RSS':>10}  cache hit rate")
        for form, r in rows.items():
            c = r["mobe_cache"]
            print(f"{form:<12} {r['prefill_tok_s']:14.0f} {base['prefill_tok_s'] / r['prefill_tok_s']:7.2f} "
                  f"{r['prefill_large_tok_s']:14.0f} {base['prefill_large_tok_s'] / r['prefill_large_tok_s']:7.2f} "
                  f"{r['decode_tok_s']:13.1f} {base['decode_tok_s'] / r['decode_tok_s']:7.2f} "
                  f"{r['peak_rss'] / 2**20:8.0f}Mi  {'' if not c else format(c['hit_rate'], '.3f')}")
    return results


def crossover(args) -> dict:
    """Time of one expert batch, factored vs materialised, by rows per expert C (Kimi/16 and tiny shapes)."""
    from mobe_stream.runtime.mobe_experts import materialize_threshold

    dtype = getattr(torch, args.dtype)
    out = {}
    for name, (n, p, r, d) in {"trained": (16, 96, 96, 256), "kimi": (16, 128, 128, 448)}.items():
        M = torch.randn(n, 2 * r, d, dtype=dtype)
        Ag, Au = torch.randn(n, p, r, dtype=dtype), torch.randn(n, p, r, dtype=dtype)
        down = torch.randn(n, d, p, dtype=dtype)
        rows = []
        measured = None
        for C in (1, 4, 16, 32, 64, 128, 256, 512, 1024):
            x = torch.randn(n, C, d, dtype=dtype)

            tf = _best(partial(_factored, x, M, Ag, Au, down, r))
            tm = _best(partial(_materialised, x, M, Ag, Au, down, r))
            if measured is None and rows and tm < tf:  # interpolate the gap linearly between grid points
                prev = rows[-1]
                g0, g1 = prev["factored_ms"] - prev["materialised_ms"], (tf - tm) * 1e3
                measured = prev["C"] + (C - prev["C"]) * (-g0) / (g1 - g0)
            rows.append({"C": C, "factored_ms": tf * 1e3, "materialised_ms": tm * 1e3})
        model = materialize_threshold(p, r, d, factor=1.0)
        out[name] = {"rows": rows, "measured_crossover": measured, "model_crossover": model,
                     "factor": None if measured is None else measured / model}
        print(f"\n{name}: n={n} p={p} r={r} d={d} ({args.dtype}); FLOP model crossover C = {model:.0f}, "
              f"measured {'-' if measured is None else format(measured, '.0f')} "
              f"(factor {'-' if measured is None else format(measured / model, '.2f')}; in use: "
              f"{materialize_threshold(p, r, d):.0f})")
        for row in rows:
            print(f"  C={row['C']:5d}  factored {row['factored_ms']:8.3f} ms   materialised {row['materialised_ms']:8.3f} ms")
    return out


def _factored(x, M, Ag, Au, down, r):
    z = torch.bmm(x, M.mT)
    return torch.bmm(torch.nn.functional.silu(torch.bmm(z[..., :r], Ag.mT)) * torch.bmm(z[..., r:], Au.mT), down.mT)


def _materialised(x, M, Ag, Au, down, r):
    g, u = torch.bmm(Ag, M[:, :r]), torch.bmm(Au, M[:, r:])
    return torch.bmm(torch.nn.functional.silu(torch.bmm(x, g.mT)) * torch.bmm(x, u.mT), down.mT)


def mixing(args) -> dict:
    """Mixing cost per forward: routed experts only vs all E (the reference), and the chunked
    one-rounding mix against one fp32 pass over the whole temporary."""
    from mobe_stream.factorize.model import mixed_bases, mixed_bases_as

    dtype = getattr(torch, args.dtype)
    E, m, r, d = 96, 16, 128, 448
    B = torch.randn(1, m, r, d).to(dtype)
    alpha = torch.randn(E, m)
    rows = []
    for n in (1, 8, 24, 48, 72, 96):
        ids = torch.arange(n)
        chunked = _best(lambda ids=ids: mixed_bases_as(alpha[ids], B, ids, E, "silu", dtype))
        one_pass = _best(lambda ids=ids: mixed_bases(alpha[ids], B, ids, E, "silu").to(dtype))
        rows.append({"routed": n, "chunked_ms": chunked * 1e3, "one_pass_ms": one_pass * 1e3})
    all_e = rows[-1]["chunked_ms"]
    print(f"\nmixing one projection (E={E}, m={m}, r={r}, d={d}, {args.dtype}); all-E (reference) = {all_e:.2f} ms")
    for row in rows:
        print(f"  routed {row['routed']:3d}: chunked {row['chunked_ms']:7.2f} ms ({row['chunked_ms'] / all_e:4.2f} of all-E)"
              f"   one fp32 pass {row['one_pass_ms']:7.2f} ms")
    return {"E": E, "m": m, "r": r, "d": d, "rows": rows}


def _best(fn, reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", default="trained,kimi")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--crossover", action="store_true")
    ap.add_argument("--mixing", action="store_true")
    ap.add_argument("--json", dest="json_out")
    ap.add_argument("--one", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", help=argparse.SUPPRESS)
    ap.add_argument("--mobe-cache", default="0", help=argparse.SUPPRESS)
    ap.add_argument("--all-e", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:
        print(json.dumps(run_one(args)))
        return
    if args.crossover or args.mixing:
        res = {"crossover": crossover(args)} if args.crossover else {}
        if args.mixing:
            res["mixing"] = mixing(args)
    else:
        res = speed(args)
    res["machine"] = {"threads": torch.get_num_threads(), "torch": torch.__version__,
                      "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
    if args.json_out:
        Path(args.json_out).write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
