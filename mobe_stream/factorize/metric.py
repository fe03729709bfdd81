"""The input metric of a calibrated fit: weigh a projection's error by the inputs it actually sees.

A gate/up row w computes w·x, so its error on the tokens routed to expert e is E[((w - ŵ)·x)²] =
(w - ŵ) H_e (w - ŵ)ᵀ with H_e = E[x xᵀ] (d x d). The calibrated objective is
Σ_e ||(W_e - Ŵ_e) H_e^{1/2}||² = Σ_e tr(R_e H_e R_eᵀ) instead of Σ_e ||R_e||².

H_e itself does not fit at scale (Kimi-K2: 384 x 7168² fp32 = 79 GB per layer), so it is held as
low rank plus diagonal, H_e ≈ V_e V_eᵀ + diag(h_e): V_e [d, k] the top-k eigen-directions of the
measured second moment (exact when the expert saw at most k distinct directions), h_e what the
top k leave of the measured diagonal plus a damping term. That is E·d·(k+1) floats (Kimi-K2,
k = 128: 1.4 GB per layer), and every product with H costs two thin matmuls (p·d·k each) instead
of one p·d² one. Each H_e is scaled to mean diagonal 1, so a weighted loss reads like the
data-free one (mean squared error of z-scored targets) and experts weigh alike.

Experts that saw few tokens borrow from the layer's pooled statistics (every token the layer's
router saw): H_e = (n_e Ĥ_e + τ H_pool) / (n_e + τ) with τ = PRIOR_TOKENS pseudo-tokens, and the
damping adds DAMP times the mean diagonal (GPTQ's 1%), so no direction ever weighs zero.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

DAMP = 0.01  # x mean(diag H): never a zero-weight direction (GPTQ's default; defaults.CALIB_DAMP for --calib)
PRIOR_TOKENS = 64  # pseudo-tokens of the layer's pooled statistics mixed into every expert's


@dataclass(frozen=True)
class InputMetric:
    """H_e = V_e V_eᵀ + diag(h_e) for a run of experts: diag [E, d], V [E, d, k] (k may be 0), fp32."""

    diag: torch.Tensor
    V: torch.Tensor

    @property
    def num_experts(self) -> int:
        return self.diag.shape[0]

    @property
    def rank(self) -> int:
        return self.V.shape[-1]

    @property
    def nbytes(self) -> int:
        return (self.diag.numel() + self.V.numel()) * 4

    def slice(self, e0: int, e1: int) -> InputMetric:
        return InputMetric(self.diag[e0:e1], self.V[e0:e1])

    def to(self, device: torch.device | str) -> InputMetric:
        return InputMetric(self.diag.to(device), self.V.to(device))

    def apply(self, R: torch.Tensor, bmm=torch.bmm, baddbmm_=None) -> torch.Tensor:
        """R H for R [k, rows, d] (a new tensor in R's dtype). `bmm` does the thin product R·V (fp32
        result), `baddbmm_(C, a, b)` adds a @ b into C, rounded once (the solver's precision: a bf16
        step keeps R·H in bf16); defaults: fp32 torch ops."""
        out = R * self.diag[:, None, :].to(R.dtype)
        if self.rank:
            RV = bmm(R, self.V)
            if baddbmm_ is None:
                out.baddbmm_(RV, self.V.transpose(1, 2))
            else:
                baddbmm_(out, RV, self.V.transpose(1, 2))
        return out

    def quadratic(self, R: torch.Tensor) -> torch.Tensor:
        """Σ over the batch of tr(R H Rᵀ) (a 0-d tensor): the weighted squared error."""
        total = (R * R * self.diag[:, None, :]).sum()
        if self.rank:
            RV = torch.bmm(R, self.V)
            total = total + (RV * RV).sum()
        return total

    def normal_equations(self, M: torch.Tensor, W: torch.Tensor, bmm=torch.bmm) -> tuple[torch.Tensor, torch.Tensor]:
        """(M H Mᵀ [k, r, r], M H Wᵀ [k, r, p]) for M [k, r, d], W [k, p, d]: the weighted least-squares
        system of A (lstsq.solve_A); M·diag and M·V are formed once for both. `bmm` does the d-long
        products, fp32 results (M and W may be bf16: a bf16 step)."""
        Mh = M * self.diag[:, None, :].to(M.dtype)  # in M's dtype (bf16 in a bf16 step)
        G, rhs = bmm(Mh, M.transpose(1, 2)), bmm(Mh, W.transpose(1, 2))
        if self.rank:  # the thin products in the same precision, fp32 results
            MV = bmm(M, self.V)
            G = G.baddbmm(MV, MV.transpose(1, 2))
            rhs = rhs.baddbmm(MV, bmm(W, self.V).transpose(1, 2))
        return G, rhs


def random_metric(E: int, d: int, k: int, device: torch.device | str = "cpu", seed: int = 2) -> InputMetric:
    """A stand-in for calibration statistics where only their shape and scale matter (the CPU
    estimate's probe, tools/bench_gpu_step.py): diag 0.01 + V Vᵀ, V [E, d, min(k, d)] with column
    scales over two decades and mean diagonal ~1, as calibration normalises its metrics."""
    k = min(k, d)
    g = torch.Generator(device=device).manual_seed(seed)
    V = torch.randn(E, d, k, generator=g, device=device) * torch.logspace(0, -2, k, device=device)
    V *= (0.99 * d / V.pow(2).sum((1, 2), keepdim=True)).sqrt()
    return InputMetric(torch.full((E, d), 0.01, device=device), V)


def low_rank_plus_diag(Y: torch.Tensor, extra_diag: torch.Tensor | None, k: int, damp: float = DAMP
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """(h [d], V [d, k']) with V Vᵀ + diag(h) ≈ H = YᵀY + diag(extra_diag), normalised to mean(diag) 1.

    Y [n, d] are rows already scaled so that YᵀY is the wanted second moment. V spans the top
    k' = min(k, n, d) eigen-directions (through the n x n Gram when n <= d, the d x d one
    otherwise: never more than min(n, d)³ work), h keeps H's exact diagonal minus what V holds,
    plus the damping."""
    n, d = Y.shape
    Y = Y.double()  # eigen-solves of a few thousand squared rows: fp64 costs little and keeps small directions
    full = (Y * Y).sum(dim=0)
    if extra_diag is not None:
        full = full + extra_diag.double()
    kk = min(k, n, d)
    if kk == 0:
        V = Y.new_zeros((d, 0))
    elif n <= d:
        vals, U = torch.linalg.eigh(Y @ Y.T)
        V = Y.T @ U[:, n - kk:]  # columns Q_i s_i: V Vᵀ = the top of YᵀY
    else:
        vals, Q = torch.linalg.eigh(Y.T @ Y)
        V = Q[:, d - kk:] * vals[d - kk:].clamp_min(0).sqrt()
    h = (full - (V * V).sum(dim=1)).clamp_min(0)
    mean = float(full.mean())
    if mean <= 0:  # all-zero inputs: the data-free metric
        return torch.ones(d, device=Y.device), torch.zeros((d, kk), device=Y.device)
    h = h + damp * mean
    scale = 1.0 / (mean * (1 + damp))
    return (h * scale).float(), (V * scale**0.5).float()


def expert_metrics(X: torch.Tensor, experts: torch.Tensor, num_experts: int, k: int, damp: float = DAMP,
                   prior_tokens: float = PRIOR_TOKENS, scales: torch.Tensor | None = None
                   ) -> tuple[InputMetric, torch.Tensor]:
    """Every expert's metric from a layer's routed inputs, and the tokens each expert saw.

    X [n, d]: the MoE inputs (after the post-attention norm) of n tokens; experts [n, top_k]: the
    experts each was routed to. Each expert's second moment is taken over the tokens routed to
    it (routing weights do not enter: the expert's own output error is what its weights decide),
    mixed with the pooled one by `prior_tokens` pseudo-counts. `scales` [n, top_k]: where the
    routing weights scale the experts' inputs (Llama-4), what each expert actually sees is the
    scaled row. Work is one expert at a time."""
    n, d = X.shape
    X = X.float()
    pooled_h, pooled_V = low_rank_plus_diag(X / max(n, 1) ** 0.5, None, k, 0.0)  # mean diag 1, no damping yet
    flat = experts.reshape(-1)
    token_of = torch.arange(n, device=X.device).repeat_interleave(experts.shape[1])
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)[:num_experts]
    diag = torch.empty((num_experts, d), device=X.device)
    V = torch.zeros((num_experts, d, min(k, d)), device=X.device)
    start = 0
    for e in range(num_experts):
        c = int(counts[e])
        pairs = order[start:start + c]
        rows = X[token_of[pairs]]
        if scales is not None:
            rows = rows * scales.reshape(-1)[pairs].float().unsqueeze(1)
        start += c
        # the prior at the expert's own scale (mean diagonal), so it weighs by count alone; an expert
        # no token reached gets the pooled metric
        scale = float((rows * rows).sum()) / (c * d) if c else 1.0
        w_own, w_prior = c / (c + prior_tokens), prior_tokens / (c + prior_tokens)
        Y = torch.cat([rows * (w_own / max(c, 1)) ** 0.5, pooled_V.T * (w_prior * max(scale, 1e-30)) ** 0.5])
        h, Ve = low_rank_plus_diag(Y, pooled_h * w_prior * max(scale, 1e-30), k, damp)
        diag[e] = h
        V[e, :, :Ve.shape[1]] = Ve
    return InputMetric(diag, V), counts
