"""Variable projection: A is never a free variable. For fixed bases and mixing weights each A_e has
a closed form, A_e = W_e M_eᵀ (M_e M_eᵀ + λI)⁻¹, so the loss is a function of (B, α) alone and Adam
only steps those. By the envelope theorem the gradient w.r.t. (B, α) at the optimal A is the
ordinary gradient with A held fixed, so one backward pass through the residual suffices.
"""

from __future__ import annotations

import torch

from .lstsq import solve_A
from .model import MoBEFactors, mixed_bases
from .solver_base import Solver


class AlternatingSolver(Solver):
    per_expert = ("alpha",)
    cost_kind = "als"

    def _params_from(self, f: MoBEFactors) -> dict[str, torch.Tensor]:
        return {"alpha": f.alpha.to(self.home, torch.float32).clone(), "B": f.B.to(self.device, torch.float32).clone()}

    def _batch_loss(self, W, per, B, idx: range):
        M = mixed_bases(per["alpha"], B, idx, self.E, self.spec.activation)
        with torch.no_grad():
            A = solve_A(W, M, self.precision.bmm)
        R = W - self.precision.bmm(A, M)
        return (R * R).sum()

    def best_factors(self) -> MoBEFactors:
        B = self.best["B"].to(self.device)
        alpha = self.best["alpha"]
        A = torch.empty((self.E, self.p, self.spec.rank), dtype=torch.float32)
        with torch.no_grad():
            for e0 in range(0, self.E, self.batch):
                e1 = min(self.E, e0 + self.batch)
                M = mixed_bases(alpha[e0:e1].to(self.device), B, range(e0, e1), self.E, self.spec.activation)
                A[e0:e1] = solve_A(self.T.slice(e0, e1).to(self.device).batch(), M).cpu()  # fp32: the stored A
        return MoBEFactors(A, self.best["B"].cpu().clone(), alpha.cpu().clone(), 1.0, self.spec.activation)
