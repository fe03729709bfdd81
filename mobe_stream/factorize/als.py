"""Variable projection: A is never a free variable. For fixed bases and mixing weights each A_e has
a closed form, A_e = W_e M_eᵀ (M_e M_eᵀ + λI)⁻¹, so the loss is a function of (B, α) alone and Adam
only steps those. By the envelope theorem the gradient w.r.t. (B, α) at the optimal A is the
ordinary gradient with A held fixed, so one backward pass through the residual suffices.

That backward pass is written out (`_batch_backward`): dM = -2 Aᵀ R, through the activation with
one fused kernel, then to the mixing weights and the bases with two matmuls per group. Autograd
would save and re-read the mixed basis, the activation's input and the residual through a chain of
elementwise ops; by hand the residual overwrites the targets' batch buffer and nothing else is kept,
which cuts the step's memory traffic (the part of a step that is not matmul; cost.py) and its
device temporaries. `_batch_loss` (the autograd form) stays as the definition the tests check it by.
"""

from __future__ import annotations

import torch

from .lstsq import solve_A
from .model import ACTIVATION_GRADS, ACTIVATIONS, MoBEFactors, expert_groups, mix, mixed_bases
from .solver_base import Solver


class AlternatingSolver(Solver):
    per_expert = ("alpha",)
    cost_kind = "als"

    def _params_from(self, f: MoBEFactors) -> dict[str, torch.Tensor]:
        return {"alpha": f.alpha.to(self.home, torch.float32).clone(), "B": f.B.to(self.device, torch.float32).clone()}

    def _batch_loss(self, W, per, B, idx: range):
        M = mixed_bases(per["alpha"], B, idx, self.E, self.spec.activation)
        with torch.no_grad():
            A = solve_A(W, M, self.precision.bmm, self._metric_of(idx))
        R = W - self.precision.bmm(A, M)
        return self._squared_error(R, idx)

    def _batch_backward(self, W, per, B, idx: range):
        alpha = per["alpha"]
        G, mg, r, d = B.shape
        k = W.shape[0]
        Bf = B.detach().view(G, mg, r * d)
        w = torch.softmax(alpha.detach(), dim=-1)
        sels = expert_groups(idx, self.E, G, W.device)
        pre = mix(w, B.detach(), sels).view(k, r, d)
        act = self.spec.activation
        M = ACTIVATIONS[act](pre)
        H = self._metric_of(idx)
        A = solve_A(W, M, self.precision.bmm, H)
        R = W.sub_(self.precision.bmm(A, M))  # W is this batch's own fp32 buffer
        if H is None:
            flat = R.view(-1)
            loss, RH = torch.dot(flat, flat), R
        else:  # calibrated: loss tr(R H Rᵀ), its gradient w.r.t. M -2 Aᵀ R H
            RH = H.apply(R)
            loss = torch.dot(R.view(-1), RH.view(-1))
        dM = self.precision.bmm(A.transpose(1, 2), RH).mul_(-2.0 / self.N)
        dpre = ACTIVATION_GRADS[act](dM, pre, M).view(k, r * d)
        del pre, M, dM, R, RH
        gw = torch.empty((k, mg), dtype=torch.float32, device=W.device)
        if B.grad is None:
            B.grad = torch.zeros_like(B)
        gB = B.grad.view(G, mg, r * d)
        for g, sel in sels:
            rows = slice(None) if sel is None else sel
            gw[rows] = dpre[rows] @ Bf[g].T
            gB[g].addmm_(w[rows].T, dpre[rows])
        galpha = w * (gw - (gw * w).sum(dim=-1, keepdim=True))  # through the softmax
        alpha.grad = galpha if alpha.grad is None else alpha.grad + galpha
        return loss

    def best_factors(self) -> MoBEFactors:
        B = self.best["B"].to(self.device)
        alpha = self.best["alpha"]
        n, lo = self.hi - self.lo, self.lo  # this shard's experts; gathered below
        A = torch.empty((n, self.p, self.spec.rank), dtype=torch.float32)
        with torch.no_grad():
            for e0 in range(0, n, self.batch):
                e1 = min(n, e0 + self.batch)
                idx = range(lo + e0, lo + e1)
                M = mixed_bases(alpha[e0:e1].to(self.device), B, idx, self.E, self.spec.activation)
                A[e0:e1] = solve_A(self.T.slice(e0, e1).to(self.device).batch(), M,
                                   metric=self._metric_of(idx)).cpu()  # fp32: the stored A
        return MoBEFactors(self._full(A), self.best["B"].cpu().clone(), self._full(alpha.cpu()).clone(), 1.0,
                           self.spec.activation)
