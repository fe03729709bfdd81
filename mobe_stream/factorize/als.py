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

Under bf16 the step's intermediates are bf16 tensors in the form the products read (precision.py:
the batch, the mixed basis, the residual formed in a GEMM epilogue, dM and its activation gradient;
B gets one bf16 copy per pass), so no product casts an fp32 tensor of the batch's size again.
"""

from __future__ import annotations

import weakref

import torch

from .lstsq import solve_A
from .model import ACTIVATION_GRADS, ACTIVATIONS, MoBEFactors, expert_groups, mix, mixed_bases
from .solver_base import Solver


class AlternatingSolver(Solver):
    per_expert = ("alpha",)
    cost_kind = "als"
    # β2 = 0.9, not Adam's 0.999: the second moment follows the gradient's scale, which shrinks
    # along a fit. Trained tiny Qwen3-MoE, 1000 `decay` steps, squared relative error: -1.1% to -1.5%
    # on the gate_proj of all 4 MoE layers and on layer 0's up_proj, fp32 and bf16 alike (β2 0.95:
    # -0.9 to -1.3%, 0.8: -1.1%, 0.5: +1.2%). The gain fades in long runs (layer 0 gate, 2000 steps
    # 0.02887 against 0.0290, 2500 steps 0.02876 against 0.0287). Calibrated: equal.
    betas = (0.9, 0.9)
    _bop_of: weakref.ref | None = None  # the leaf B that `_bop` was made from
    _bop: torch.Tensor | None = None

    def _params_from(self, f: MoBEFactors) -> dict[str, torch.Tensor]:
        return {"alpha": f.alpha.to(self.home, torch.float32).clone(), "B": f.B.to(self.device, torch.float32).clone()}

    def _batch_loss(self, W, per, B, idx: range):
        M = mixed_bases(per["alpha"], B, idx, self.E, self.spec.activation)
        with torch.no_grad():
            A = solve_A(W, M, self.precision.bmm, self._metric_of(idx))
        R = W - self.precision.bmm(A, M)
        return self._squared_error(R, idx)

    def _work_dtype(self) -> torch.dtype:
        """bf16 intermediates under --precision bf16 (precision.py), a calibrated fit's too."""
        return self.precision.work_dtype

    def _basis_operand(self, B: torch.Tensor) -> torch.Tensor:
        """B [G, m_g, r·d] in the products' operand form, made once per pass (every batch of a step
        passes the same leaf B): a view under fp32, a bf16 copy under bf16."""
        if self._bop_of is None or self._bop_of() is not B:
            G, mg, r, d = B.shape
            self._bop = None  # the last pass's copy goes first: one copy of B's size at a time
            self._bop = self.precision.operand(B.detach()).reshape(G, mg, r * d)
            self._bop_of = weakref.ref(B)
        assert self._bop is not None
        return self._bop

    def _batch_backward(self, W, per, B, idx: range):
        prec = self.precision
        alpha = per["alpha"]
        G, mg, r, d = B.shape
        k = W.shape[0]
        wd = W.dtype  # the batch's targets in the work dtype (solver_base._targets)
        Bop = self._basis_operand(B)
        w = torch.softmax(alpha.detach(), dim=-1)
        wop = prec.operand(w)
        sels = expert_groups(idx, self.E, G, W.device)
        pre = mix(wop, Bop, sels, lambda w_, Bg: prec.product(w_, Bg, wd)).view(k, r, d)
        act = self.spec.activation
        M = ACTIVATIONS[act](pre)
        H = self._metric_of(idx)
        A = solve_A(W, M, prec.bmm, H)
        if H is None:
            R = prec.residual_(W, A, M)  # W is this batch's own buffer
            flat = R.view(-1)
            loss = torch.dot(flat, flat) if wd == torch.float32 else \
                torch.linalg.vector_norm(flat, dtype=torch.float32).square()
            RH = R
        else:  # calibrated: loss tr(R H Rᵀ), its gradient w.r.t. M -2 Aᵀ R H; A carried in two parts
            R = prec.residual_split_(W, A, M)
            RH = H.apply(R, prec.bmm, prec.baddbmm_)
            loss = torch.dot(R.view(-1), RH.view(-1)) if wd == torch.float32 else \
                (R * RH).sum(dtype=torch.float32)
        # the gradient's scale folds into Aᵀ (p x r), not into dM (r x d per expert)
        dM = prec.product(prec.operand(A.transpose(1, 2) * (-2.0 / self.N)), prec.operand(RH), wd)
        dpre = ACTIVATION_GRADS[act](dM, pre, M).view(k, r * d)
        del pre, M, dM, R, RH
        gw = torch.empty((k, mg), dtype=torch.float32, device=W.device)
        if B.grad is None:
            B.grad = torch.zeros_like(B)
        gB = B.grad.view(G, mg, r * d)
        for g, sel in sels:
            rows = slice(None) if sel is None else sel
            gw[rows] = prec.product(dpre[rows], Bop[g].T)
            prec.accumulate_(gB[g], wop[rows].T, dpre[rows])
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
