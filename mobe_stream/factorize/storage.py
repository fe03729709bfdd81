"""Fitting for storage: a narrow storage dtype must not waste the fit.

The shared part of a factorization (MoBE bases B, low-rank V and group means) is rounded through
storage first; the per-expert part (A, U) is then re-solved in closed form against the bases as
they will be read back, so it absorbs the bases' rounding error (least squares is exact for fixed
bases). Only A's own rounding remains. Costs about a third of one Adam step (Gram matrices and a
Cholesky solve per expert), once per projection.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .baselines import LowRankFactors
from .lstsq import solve_A
from .metric import InputMetric
from .model import MoBEFactors, mixed_bases
from .targets import Targets

Roundtrip = Callable[[torch.Tensor], torch.Tensor]  # a tensor as it reads back after storage (fp32)


def refit_for_storage(W: torch.Tensor | Targets, factors: MoBEFactors | LowRankFactors, roundtrip: Roundtrip,
                      device: str | torch.device = "cpu", expert_batch: int = 16,
                      metric: InputMetric | None = None) -> MoBEFactors | LowRankFactors:
    """Factors of W [E, p, d] whose shared part is `roundtrip(shared)` and whose per-expert part is
    the least-squares fit against it (in fp32; the caller rounds it when storing); weighted by the
    input metric of a calibrated MoBE fit when one is given."""
    T = Targets.of(W)
    E, p, _ = T.shape
    if isinstance(factors, MoBEFactors):
        B = roundtrip(factors.B.float()).to(device)
        alpha = factors.alpha.float()
        A = torch.empty((E, p, B.shape[2]), dtype=torch.float32)
        for e0 in range(0, E, expert_batch):
            e1 = min(E, e0 + expert_batch)
            M = mixed_bases(alpha[e0:e1], B, range(e0, e1), E, factors.activation)
            H = None if metric is None else metric.slice(e0, e1).to(device)
            A[e0:e1] = solve_A(T.slice(e0, e1).to(device).batch() / factors.scale, M, metric=H).cpu()
        return MoBEFactors(A, B.cpu(), alpha, factors.scale, factors.activation)
    mean = None if factors.mean is None else roundtrip(factors.mean.float())
    V = roundtrip(factors.V.float())
    U = torch.empty_like(factors.U, dtype=torch.float32)
    G = 1 if mean is None else mean.shape[0]
    for e0 in range(0, E, expert_batch):
        e1 = min(E, e0 + expert_batch)
        target = T.slice(e0, e1).to(device).batch() / factors.scale
        if mean is not None:
            target = target - mean.to(device)[torch.arange(e0, e1) // (E // G)]
        U[e0:e1] = solve_A(target, V[e0:e1].to(device)).cpu()
    return LowRankFactors(U, V, mean, factors.scale)
