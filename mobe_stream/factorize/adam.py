"""The paper's solver: Adam on A, B and α together, minimising the MSE of the z-scored targets."""

from __future__ import annotations

import torch

from .model import MoBEFactors, mixed_bases
from .solver_base import Solver


class AdamSolver(Solver):
    per_expert = ("A", "alpha")
    cost_kind = "adam"

    def _params_from(self, f: MoBEFactors) -> dict[str, torch.Tensor]:
        return {"A": f.A.to(self.home, torch.float32).clone(), "alpha": f.alpha.to(self.home, torch.float32).clone(),
                "B": f.B.to(self.device, torch.float32).clone()}

    def _batch_loss(self, W, per, B, idx: range):
        M = mixed_bases(per["alpha"], B, idx, self.E, self.spec.activation)
        R = W - self.precision.bmm(per["A"], M)
        return self._squared_error(R, idx)

    def best_factors(self) -> MoBEFactors:
        return MoBEFactors(self._full(self.best["A"].cpu()).clone(), self.best["B"].cpu().clone(),
                           self._full(self.best["alpha"].cpu()).clone(), 1.0, self.spec.activation)
