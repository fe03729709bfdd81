#!/usr/bin/env python3
"""One projection at true scale on a device: the prepared GPU check of issue 12 (run it when a GPU
is lent; no GPU has run the solver yet). Nothing here is asserted; the figures go into issue notes.

Builds FP8 block-scaled targets of Kimi-K2's shape (default 384 x 2048 x 7168; m=128 as 2 groups of
64, r=p) directly on the device from structured random experts (cluster means + low rank + noise,
scaled like trained weights), then measures:
- the init: one grouped-SVD sub-group ([E/m·p, d] fp32, torch.linalg.svd on the device), timed and
  multiplied by m (the whole `scaled` init with --full-init);
- the als solver's steps at --precision under a device budget (default 72 GB: an 80 GB card at 90%,
  whatever card runs it, so an H200 measures the H100 plan): seconds per step, achieved TFLOP/s
  (factorize/cost.py's FLOPs) against the card's bf16 peak, peak device memory against the memory
  plan, and the cost model's step time for the same plan (pipeline/estimate.py);
- peak host RSS.
With --calib-rank k the fit is a calibrated one (`compress --calib`) against a random input metric
of that rank (factorize.metric.random_metric): the step that adds R·H and, under
bf16, carries A in two parts (Precision.residual_split_).
One JSON object on stdout, also written to $OUT/bench_gpu_step.json when $OUT is set.

    python tools/bench_gpu_step.py --steps 20                      # on the GPU, a few minutes
    python tools/bench_gpu_step.py --experts 8 --p 64 --d 256 --num-bases 4 --device cpu --steps 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mobe_stream.checkpoint.fp8 import quantize_stack
from mobe_stream.factorize import AlternatingSolver, MoBEFactors, MoBESpec, Targets, random_metric, zscored
from mobe_stream.factorize.cost import step_flops
from mobe_stream.factorize.init import BASIS_RMS, OWN_LOGIT
from mobe_stream.pipeline.estimate import GPUS, estimate, hardware_key

GEN_CHUNK = 16  # experts generated and quantized at a time (fp32 temporaries of 16 experts)


def fp8_targets(E: int, p: int, d: int, device: torch.device, seed: int = 0) -> Targets:
    """[E, p, d] FP8 + 128x128 block scales made on `device` a chunk at a time: 8 cluster means,
    a rank-p/8 part per expert and noise (the synthetic experts of bench_solver, never whole in fp32)."""
    g = torch.Generator(device=device).manual_seed(seed)
    C = torch.randn(8, p, d, generator=g, device=device) * 0.015
    k = max(1, p // 8)
    qs, ss = [], []
    for e0 in range(0, E, GEN_CHUNK):
        e1 = min(E, e0 + GEN_CHUNK)
        n = e1 - e0
        low = torch.bmm(torch.randn(n, p, k, generator=g, device=device), torch.randn(n, k, d, generator=g, device=device))
        W = C[torch.arange(e0, e1, device=device) * 8 // E] + low * (0.012 / k**0.5)
        W += torch.randn(n, p, d, generator=g, device=device) * 0.003
        q, s = quantize_stack(W)
        qs.append(q)
        ss.append(s)
        del W, low
    return Targets(torch.cat(qs), torch.cat(ss))


def cheap_start(E: int, spec: MoBESpec, d: int, device: torch.device) -> MoBEFactors:
    """Random bases at the `scaled` start's RMS, own-basis logits: the step's cost does not depend on
    where the fit starts, so the device time goes to the steps (the SVD init is timed apart)."""
    G, mg, r = spec.groups, spec.bases_per_group, spec.rank
    B = torch.randn(G, mg, r, d, generator=torch.Generator().manual_seed(1)) * BASIS_RMS
    alpha = torch.zeros(E, mg)
    per = E // G
    for e in range(E):
        alpha[e, (e % per) * mg // per] = OWN_LOGIT
    return MoBEFactors(torch.zeros(()).expand(E, 1, 1), B, alpha, 1.0, spec.activation)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--p", type=int, default=2048)
    ap.add_argument("--d", type=int, default=7168)
    ap.add_argument("--num-bases", type=int, default=128)
    ap.add_argument("--groups", type=int, default=2)
    ap.add_argument("--rank", type=int, default=None, help="default p")
    ap.add_argument("--precision", default="bf16", choices=("fp32", "tf32", "bf16"))
    ap.add_argument("--steps", type=int, default=20, help="timed steps (after 2 warm-up steps)")
    ap.add_argument("--budget-gb", type=float, default=72.0, help="device bytes the plan may use (GB)")
    ap.add_argument("--full-init", action="store_true", help="run the whole `scaled` init instead of one SVD")
    ap.add_argument("--calib-rank", type=int, default=None, help="a calibrated fit against a random metric of this rank")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args()

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(dev)) if cuda else (lambda: None)
    E, p, d = args.experts, args.p, args.d
    spec = MoBESpec(args.num_bases, args.rank or p, "silu", args.groups)
    out: dict = {"shape": [E, p, d], "num_bases": spec.num_bases, "groups": spec.groups, "rank": spec.rank,
                 "precision": args.precision, "device": torch.cuda.get_device_name(dev) if cuda else "cpu",
                 "torch": torch.__version__, "calib_rank": args.calib_rank}

    t0 = time.perf_counter()
    T, std = zscored(fp8_targets(E, p, d, dev))
    sync()
    out["targets_seconds"] = time.perf_counter() - t0
    out["target_bytes"] = T.nbytes

    rows = E // spec.num_bases * p  # one sub-group's stacked rows
    X = T.slice(0, E // spec.num_bases).batch().reshape(rows, d)
    sync()
    t0 = time.perf_counter()
    torch.linalg.svd(X, full_matrices=False)
    sync()
    svd_s = time.perf_counter() - t0
    out["init_svd_shape"] = [rows, d]
    out["init_svd_seconds"] = svd_s
    out["init_seconds_extrapolated"] = svd_s * spec.num_bases
    del X

    budget = int(args.budget_gb * 1e9) if cuda else None
    if cuda:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(dev)
    total = args.steps + 2
    t0 = time.perf_counter()
    init = "scaled" if args.full_init else cheap_start(E, spec, d, dev)
    metric = None if args.calib_rank is None else random_metric(E, d, args.calib_rank, dev)
    s = AlternatingSolver(T, spec, device=dev, precision=args.precision, max_device_bytes=budget, init=init,
                          schedule="decay", total_steps=total, metric=metric)
    sync()
    out["solver_setup_seconds"] = time.perf_counter() - t0  # the whole init with --full-init
    losses = [float(s.step()) for _ in range(2)]  # warm-up: allocator, cuBLAS handles and plans
    sync()
    t0 = time.perf_counter()
    for _ in range(args.steps):
        s.step()
    sync()
    step_s = (time.perf_counter() - t0) / max(1, args.steps)
    losses.append(float(s.last_loss))
    flops = step_flops("als", E, p, d, spec, args.calib_rank, args.precision)
    out.update(batch=s.batch, resident=s.plan.resident, plan_device_bytes=s.plan.device_bytes,
               plan_pcie_bytes_per_step=s.plan.pcie_bytes_per_step, step_seconds=step_s,
               steps_per_second=1 / step_s, flops_per_step=flops, achieved_tflops=flops / step_s / 1e12,
               loss_first=losses[0], loss_last=losses[-1])
    key = hardware_key(str(dev))
    if cuda:
        out["peak_device_bytes"] = torch.cuda.max_memory_allocated(dev)
        if key in GPUS:
            out["fraction_of_bf16_peak"] = out["achieved_tflops"] / GPUS[key].tflops["bf16"]
    if key is not None:
        est = estimate(E, p, d, spec, solver="als", precision=args.precision, steps=1000, projections=120,
                       targets=T.nbytes, device=key, budget=budget, metric_rank=args.calib_rank)
        out.update(estimate_step_seconds=est.step_seconds, estimate_batch=est.batch,
                   estimate_traffic_bytes_per_step=est.traffic_bytes_per_step,
                   measured_over_estimate=step_s / est.step_seconds)
    out["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    text = json.dumps(out, indent=1)
    print(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "bench_gpu_step.json").write_text(text + "\n")


if __name__ == "__main__":
    main()
