"""The closed-form A of MoBE: for fixed mixed bases M_e, A_e = W_e M_eᵀ (M_e M_eᵀ + λI)⁻¹.

Its own module because both the init (least-squares A for fixed bases) and the variable-projection
solver use it; neither should import the other.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .metric import InputMetric

Bmm = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

RIDGE = 1e-6  # relative to the mean eigenvalue of M Mᵀ: keeps the solve well posed, biases nothing measurable


def solve_A(W: torch.Tensor, M: torch.Tensor, bmm: Bmm = torch.bmm, metric: InputMetric | None = None) -> torch.Tensor:
    """argmin_A ||W - A M||² (+ tiny ridge), batched over experts: [k, p, r]. `bmm` computes the
    two products (the solver's precision); the factorisation and solve are fp32. With a metric
    (calibrated fit, metric.py) the weighted argmin of tr((W - A M) H (W - A M)ᵀ):
    A = W H Mᵀ (M H Mᵀ)⁻¹."""
    if metric is None:
        G, rhs = bmm(M, M.transpose(1, 2)), bmm(M, W.transpose(1, 2))  # [k, r, r], [k, r, p]
    else:
        G, rhs = metric.normal_equations(M, W, bmm)
    r = G.shape[-1]
    lam = RIDGE * G.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)
    G = G + lam[:, None, None] * torch.eye(r, dtype=G.dtype, device=G.device)
    # Cholesky: the ridge makes G positive definite and it is ~1.7x faster than LU for small
    # batched systems on CPU. Reading `info` would be a host sync on CUDA, so there a failed
    # factorisation shows up as NaN (the fit rolls back on NaN); on CPU it falls back to LU.
    L, info = torch.linalg.cholesky_ex(G)
    if G.device.type == "cpu" and bool(info.any()):
        return torch.linalg.solve_ex(G, rhs)[0].transpose(1, 2)
    return torch.cholesky_solve(rhs, L).transpose(1, 2)
