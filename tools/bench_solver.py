#!/usr/bin/env python3
"""Solver comparison on trained experts (the default: tools/train_tiny_moe.py's cached model), a
checkpoint's layers, or structured synthetic experts; figures go into issue notes, nothing here is
asserted.

Per solver[:init[:precision[:schedule]]]: relative error (and its square, the reference's MSE / mean square)
after step and wall-time budgets, steps/s, achieved GFLOP/s (factorize/cost.py's FLOPs), and the
cost model's predicted step time (pipeline/estimate.py, rates measured on this CPU) against the
measured one. With --reference PATH/train.py the paper's own code runs unmodified on the same layer
(as a subprocess, on this checkpoint, same m, r, steps) and its reconstruction is scored the same way.

    python tools/bench_solver.py --trained --layers all --steps 100,500,2000 --solvers adam:paper,als:paper
    python tools/bench_solver.py --trained --layers all --steps 1000 --solvers als:scaled:fp32:constant,als:scaled:fp32:decay
    python tools/bench_solver.py --trained --layers 0 --reference /tmp/MoBE/train.py --steps 2000
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobe_stream.factorize import (
    MoBESpec,
    Targets,
    expert_cut,
    fit_baseline,
    plan_method,
    relative_error,
    zscored,
)
from mobe_stream.factorize.cost import step_flops
from mobe_stream.pipeline.estimate import estimate
from mobe_stream.pipeline.solvers import SOLVERS


def synthetic(E: int, p: int, d: int, clusters: int = 8, seed: int = 0, shuffle: bool = False) -> torch.Tensor:
    """W_e = C_cluster + low-rank + noise, scaled like trained weights. Clusters are contiguous runs of
    expert ids unless `shuffle` (a trained checkpoint's expert numbering carries no similarity)."""
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(clusters, p, d, generator=g) * 0.015
    k = max(1, p // 8)
    out = torch.empty(E, p, d)
    for e in range(E):
        low = torch.randn(p, k, generator=g) @ torch.randn(k, d, generator=g) * (0.012 / k**0.5)
        out[e] = C[e * clusters // E] + low + torch.randn(p, d, generator=g) * 0.003
    if shuffle:
        out = out[torch.randperm(E, generator=torch.Generator().manual_seed(seed + 1))].contiguous()
    return out


def trained_path() -> Path:
    """The default recipe's model from tools/train_tiny_moe.py (trained on first use, ~15 min)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import train_tiny_moe as ttm

    recipe = dict(ttm.DEFAULTS)
    out = ttm.cached_path(recipe)
    if not (out / "recipe.json").exists():
        print(f"training the tiny Qwen3-MoE first (cached at {out})", flush=True)
        ttm.train(recipe, out, torch.get_num_threads())
    return out


def checkpoint_layers(path: Path, layers: str) -> list[int]:
    from mobe_stream.checkpoint.families import get_family
    from mobe_stream.checkpoint.reader import CheckpointReader

    with CheckpointReader(path) as r:
        moe = get_family(r.config, r).moe_layers()
    return moe if layers == "all" else [int(x) for x in layers.split(",")]


def from_checkpoint(path: Path, layer: int, proj: str) -> Targets:
    """The layer's targets as the solver gets them in compress: in the stored precision."""
    from mobe_stream.checkpoint.families import get_family
    from mobe_stream.checkpoint.reader import CheckpointReader

    with CheckpointReader(path) as r:
        fam = get_family(r.config, r)
        data, scales = fam.expert_stack_stored(r, layer, proj)
        return Targets(data.clone(), scales, r.scale_block)


def trajectory(name: str, W: Targets, spec: MoBESpec, max_steps: int, max_seconds: float, device: str, lr: float):
    """(seconds, step, relative error of the best iterate) after every step, until both budgets are
    spent, plus the per-step times. The error comes from best_loss (z-scored targets: rel = sqrt(best / mean W²))."""
    solver, init, precision, schedule = (name.split(":") + ["", "", ""])[:4]
    s = SOLVERS[solver](W, spec, lr=lr, device=device, init=init or "paper", precision=precision or "fp32",
                        schedule=schedule or "constant", total_steps=max_steps)
    ms = W.mean_square()
    out, times = [], []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while s.step_count < max_steps or time.perf_counter() - t0 < max_seconds:
        t1 = time.perf_counter()
        s.step()
        best = s.best_loss  # syncs
        times.append(time.perf_counter() - t1)
        out.append((time.perf_counter() - t0, s.step_count, (best / ms) ** 0.5))
    return out, s, times


def at_step(tr, n):
    return next((x for x in tr if x[1] >= n), tr[-1])


def at_time(tr, t):
    last = tr[0]
    for x in tr:
        if x[0] > t:
            break
        last = x
    return last


def run_reference(train_py: Path, ckpt: Path, layer: int, proj: str, E: int, p: int, d: int, m: int, r: int,
                  steps: int, activation: str) -> tuple[Path, float]:
    """The reference's train.py, unmodified, on one layer; returns its reconstruction file and seconds."""
    out = Path(tempfile.mkdtemp(prefix="mobe-ref-"))
    cmd = [sys.executable, str(train_py), "--index_path", str(ckpt / "model.safetensors.index.json"),
           "--base_dir", str(ckpt), "--save_path", str(out), "--num_matrices", str(E), "--rows_per_matrix", str(p),
           "--cols", str(d), "--num_epochs", str(steps), "--batch_size", str(E), "--num_batches", "1",
           "--num_B", str(m), "--truncation", str(r), "--start_layer", str(layer), "--end_layer", str(layer + 1),
           "--matrix_type", proj, "--activation", activation]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out / f"model_layers_{layer}_mlp_{proj}_weight.safetensors", time.perf_counter() - t0


def reference_error(recon: Path, W: Targets, proj: str) -> float:
    from safetensors import safe_open

    num = den = 0.0
    with safe_open(str(recon), framework="pt") as f:
        for e in range(W.shape[0]):
            w = W.batch(e, e + 1)[0].double()
            num += float(((f.get_tensor(f"experts_{e}_{proj}_weight").double() - w) ** 2).sum())
            den += float((w**2).sum())
    return (num / den) ** 0.5


def bench_layer(W: Targets, args, label: str) -> dict[str, float]:
    E, p, d = W.shape
    r = args.rank or p
    spec = MoBESpec(args.num_bases, r, args.activation, args.groups)
    Wz, _ = zscored(W)
    steps = [int(x) for x in args.steps.split(",")]
    secs = [float(x) for x in args.seconds.split(",")] if args.seconds else [0.0]
    print(f"\n== {label}: experts {E} x {p}x{d} ({W.dtype}), m={args.num_bases}, r={r}, groups={args.groups}, "
          f"{args.activation}, device {args.device}, expert-parameter cut {100 * expert_cut(E, p, d, args.num_bases, r):.1f}%, "
          f"threads {torch.get_num_threads()}")
    finals = {}
    budget = plan_method("mobe", E, p, d, spec).params(E, p, d)
    for method in filter(None, args.methods.split(",")):
        plan = plan_method(method, E, p, d, spec)
        f = fit_baseline(Wz.dense(), plan, args.device)
        print(f"{method:>6}: rank {plan.rank}, {plan.params(E, p, d) / budget:.3f} of the MoBE budget, "
              f"rel.err {relative_error(Wz, f):.4f} (closed form)")
    trs = {}
    for name in filter(None, args.solvers.split(",")):
        tr, solver, times = trajectory(name, Wz, spec, max(steps), max(secs), args.device, args.lr)
        trs[name] = tr
        kind = name.split(":")[0]
        precision = (name.split(":") + ["", ""])[2] or "fp32"
        med = statistics.median(times[1:] or times)
        pred = estimate(E, p, d, spec, solver=kind, precision=precision, steps=1, projections=1, targets=Wz.nbytes,
                        device="cpu" if args.device == "cpu" else "h100").step_seconds
        flops = step_flops(kind, E, p, d, spec)
        check = relative_error(Wz, solver.best_factors())
        print(f"{name}: {tr[-1][1]} steps in {tr[-1][0]:.1f}s; step {1e3 * med:.2f} ms measured (median), "
              f"{1e3 * pred:.2f} ms predicted ({100 * (pred / med - 1):+.0f}%), {flops / med / 1e9:.1f} GFLOP/s; "
              f"final rel.err {tr[-1][2]:.4f} (sq {tr[-1][2] ** 2:.4f}; recomputed {check:.4f})")
        for n in steps:
            t, k, e = at_step(tr, n)
            print(f"  {n:>6} steps: rel.err {e:.4f} (sq {e * e:.4f}) at {t:7.1f}s")
            finals[f"{name}@{n}"] = e
        for sec in secs if args.seconds else []:
            t, k, e = at_time(tr, sec)
            print(f"  {sec:>6}s    : rel.err {e:.4f} (sq {e * e:.4f}) after {k} steps")
    if args.reference:
        for n in steps:
            recon, dt = run_reference(Path(args.reference), args.ckpt, args.current_layer, args.proj, E, p, d,
                                      args.num_bases, r, n, args.activation)
            e = reference_error(recon, W, args.proj)
            finals[f"reference@{n}"] = e
            print(f"reference train.py, {n} epochs: rel.err {e:.4f} (sq {e * e:.4f}) in {dt:.1f}s (process wall time)")
    return finals


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group()
    src.add_argument("--trained", action="store_true", help="tools/train_tiny_moe.py's cached model (trains it once)")
    src.add_argument("--checkpoint", type=Path, default=None, help="a checkpoint's layers")
    ap.add_argument("--layers", default=None, help="MoE layers of the checkpoint: 0,2 or all (default: the first)")
    ap.add_argument("--proj", default="gate_proj")
    ap.add_argument("--experts", type=int, default=64, help="synthetic experts (without --trained/--checkpoint)")
    ap.add_argument("--p", type=int, default=768)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--order", choices=("shuffled", "contiguous"), default="shuffled")
    ap.add_argument("--num-bases", type=int, default=8)
    ap.add_argument("--rank", type=int, default=None, help="default p")
    ap.add_argument("--groups", type=int, default=1)
    ap.add_argument("--activation", default="silu")
    ap.add_argument("--steps", default="100,500,2000")
    ap.add_argument("--seconds", default="", help="wall-time budgets too, e.g. 10,30")
    ap.add_argument("--solvers", default="adam:paper,als:paper",
                    help="solver[:init[:precision[:schedule]]] list; init paper, clustered, scaled or fitted; "
                         "precision fp32, tf32, bf16; schedule constant (here the default) or decay")
    ap.add_argument("--methods", default="", help="closed-form baselines at the same budget (svd,molae,delta)")
    ap.add_argument("--reference", default=None, help="path of the reference's train.py to run unmodified")
    ap.add_argument("--lr", type=float, default=0.07)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    args.ckpt = trained_path() if args.trained else args.checkpoint
    results = []
    if args.ckpt is None:
        W = synthetic(args.experts, args.p, args.d, shuffle=args.order == "shuffled")
        results.append(bench_layer(Targets(W), args, f"synthetic ({args.order})"))
    else:
        for layer in checkpoint_layers(args.ckpt, args.layers or "0"):
            args.current_layer = layer
            results.append(bench_layer(from_checkpoint(args.ckpt, layer, args.proj), args, f"layer {layer} {args.proj}"))
    if len(results) > 1:
        print("\nmean over layers: " + ", ".join(f"{k} {statistics.mean(r[k] for r in results):.4f}"
                                                  for k in results[0]))


if __name__ == "__main__":
    main()
