"""Solver registry: `--solver` name -> factorize solver class (pipeline-side, so factorize stays pure).

Names are validated with the other options (options.py) before any work starts."""

from __future__ import annotations

import torch

from ..factorize import AdamSolver, AlternatingSolver, ExpertShard, InputMetric, MoBESpec, Targets

SOLVERS = {"adam": AdamSolver, "als": AlternatingSolver}


def make_solver(name: str, W_scaled: torch.Tensor | Targets, spec: MoBESpec, *, lr: float, device: str,
                max_device_bytes: int | None, seed: int, tol: float | None, expert_batch: int | None = None,
                init: str = "paper", precision: str = "fp32", metric: InputMetric | None = None,
                shard: ExpertShard | None = None, schedule: str = "constant", total_steps: int | None = None):
    return SOLVERS[name](W_scaled, spec, lr=lr, device=device, max_device_bytes=max_device_bytes, seed=seed, tol=tol,
                         expert_batch=expert_batch, init=init, precision=precision, metric=metric, shard=shard,
                         schedule=schedule, total_steps=total_steps)
