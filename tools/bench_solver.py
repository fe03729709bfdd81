#!/usr/bin/env python3
"""Solver and method comparison on structured synthetic experts (or a real checkpoint's layer).

For each solver: relative error after fixed step budgets and after fixed wall-time budgets,
steps/s, and the parameter cut. Figures go into issue notes; nothing here is asserted.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobe_stream.factorize import MoBESpec, expert_cut, fit_baseline, plan_method, prepare_targets, relative_error
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


def from_checkpoint(path: str, layer: int | None, proj: str) -> torch.Tensor:
    from mobe_stream.checkpoint.families import get_family
    from mobe_stream.checkpoint.reader import CheckpointReader

    with CheckpointReader(path) as r:
        fam = get_family(r.config, r)
        layer = fam.moe_layers()[0] if layer is None else layer
        return fam.expert_stack(r, layer, proj, torch.float32)


def trajectory(name: str, W: torch.Tensor, spec: MoBESpec, max_steps: int, max_seconds: float, device: str,
               lr: float) -> tuple[list[tuple[float, int, float]], object]:
    """(seconds, step, relative error of the best iterate) after every step, until both budgets are
    spent. The error comes from best_loss (targets are z-scored, so rel = sqrt(best / mean W²))."""
    solver, _, init = name.partition(":")
    s = SOLVERS[solver](W, spec, lr=lr, device=device, init=init or "paper")
    ms = float((W.double() ** 2).mean())
    out = []
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    sync()
    t0 = time.perf_counter()
    while s.step_count < max_steps or time.perf_counter() - t0 < max_seconds:
        s.step()
        best = s.best_loss  # syncs
        out.append((time.perf_counter() - t0, s.step_count, (best / ms) ** 0.5))
    return out, s


def at_step(tr, n):
    return next((x for x in tr if x[1] >= n), tr[-1])


def at_time(tr, t):
    last = tr[0]
    for x in tr:
        if x[0] > t:
            break
        last = x
    return last


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--p", type=int, default=768)
    ap.add_argument("--d", type=int, default=2048)
    ap.add_argument("--num-bases", type=int, default=8)
    ap.add_argument("--rank", type=int, default=None, help="default p")
    ap.add_argument("--activation", default="silu")
    ap.add_argument("--steps", default="100,500,2000")
    ap.add_argument("--seconds", default="10,30,60")
    ap.add_argument("--solvers", default="adam,adam:clustered,als:clustered",
                    help="solver[:init] list; init paper (default), clustered or fitted")
    ap.add_argument("--methods", default="svd,molae,delta", help="closed-form baselines at the same budget ('' for none)")
    ap.add_argument("--lr", type=float, default=0.07)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--order", choices=("shuffled", "contiguous"), default="shuffled",
                    help="synthetic experts: similar experts at random ids (as in trained models) or in contiguous runs")
    ap.add_argument("--checkpoint", default=None, help="use a layer of this checkpoint instead of synthetic experts")
    ap.add_argument("--layer", type=int, default=None)
    ap.add_argument("--proj", default="gate_proj")
    args = ap.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    W = from_checkpoint(args.checkpoint, args.layer, args.proj) if args.checkpoint else synthetic(args.experts, args.p, args.d,
                                                                                        shuffle=args.order == "shuffled")
    E, p, d = W.shape
    W, _ = prepare_targets(W)
    r = args.rank or p
    spec = MoBESpec(args.num_bases, r, args.activation)
    steps = [int(x) for x in args.steps.split(",")]
    secs = [float(x) for x in args.seconds.split(",")]
    order = "" if args.checkpoint else f", {args.order} synthetic clusters"
    print(f"experts {E} x {p}x{d}{order}, m={args.num_bases}, r={r}, {args.activation}, device {args.device}, "
          f"expert-parameter cut {100 * expert_cut(E, p, d, args.num_bases, r):.1f}%, threads {torch.get_num_threads()}")
    budget = plan_method("mobe", E, p, d, spec).params(E, p, d)
    for method in filter(None, args.methods.split(",")):
        plan = plan_method(method, E, p, d, spec)
        t0 = time.perf_counter()
        f = fit_baseline(W, plan, args.device)
        dt = time.perf_counter() - t0
        cut = 1 - (E * p * d + 2 * plan.params(E, p, d)) / (3 * E * p * d)
        print(f"{method:>6}: rank {plan.rank}, {plan.params(E, p, d) / budget:.3f} of the MoBE budget, "
              f"expert-parameter cut {100 * cut:.1f}%, rel.err {relative_error(W, f):.4f} in {dt:.2f}s (closed form)")
    trs = {}
    for name in args.solvers.split(","):
        tr, solver = trajectory(name, W, spec, max(steps), max(secs), args.device, args.lr)
        trs[name] = tr
        check = relative_error(W, solver.best_factors())
        print(f"\n{name}: {tr[-1][1]} steps in {tr[-1][0]:.1f}s ({tr[-1][1] / tr[-1][0]:.2f} steps/s); "
              f"final rel.err {tr[-1][2]:.4f} (recomputed from factors: {check:.4f})")
        print(f"  {'budget':>12} {'rel.err':>8} {'time s':>8} {'steps':>6}")
        for n in steps:
            t, k, e = at_step(tr, n)
            print(f"  {str(n) + ' steps':>12} {e:8.4f} {t:8.1f} {k:6d}")
        for sec in secs:
            t, k, e = at_time(tr, sec)
            print(f"  {str(sec) + ' s':>12} {e:8.4f} {t:8.1f} {k:6d}")
    if "adam" in trs:
        ta, ka, ea = at_step(trs["adam"], max(steps))
        print(f"\nadam after {ka} steps: rel.err {ea:.4f} in {ta:.1f}s")
        for name, tr in trs.items():
            if name == "adam":
                continue
            hit = next((x for x in tr if x[2] <= ea), None)
            if hit:
                print(f"{name} reaches it after {hit[1]} steps, {hit[0]:.1f}s = {hit[0] / ta:.3f} of adam's time")
            else:
                print(f"{name} does not reach it within {tr[-1][0]:.1f}s")
            _, _, eq = at_time(tr, ta)
            print(f"at adam's wall time ({ta:.1f}s) {name}: rel.err {eq:.4f} ({100 * (1 - eq / ea):.1f}% lower)")


if __name__ == "__main__":
    main()
