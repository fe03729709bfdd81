"""Grouped-SVD initialisation (as published): each basis starts as the top-r right singular
vectors of a contiguous sub-group of experts, A_e from the matching left vectors, α one-hot.

Uses torch.linalg.svd (economy) of the stacked [k·p, d] sub-group matrix in fp32 on the solver's
device; no Gram/eigh route (it squares the condition number, and one SVD per sub-group is a
one-off cost next to thousands of solver passes). Bases beyond the available rank are zero.
"""

from __future__ import annotations

import torch

from .model import MoBEFactors, MoBESpec


def init_grouped_svd(W: torch.Tensor, spec: MoBESpec, device: str | torch.device = "cpu") -> MoBEFactors:
    E, p, d = W.shape
    G, mg, r = spec.groups, spec.bases_per_group, spec.rank
    if E % G:
        raise ValueError(f"{E} experts cannot be split into {G} groups")
    per_group = E // G
    if mg > per_group:
        raise ValueError(f"{mg} bases per group need at least as many experts per group (have {per_group})")
    A = torch.zeros((E, p, r), dtype=torch.float32)
    B = torch.zeros((G, mg, r, d), dtype=torch.float32)
    alpha = torch.zeros((E, mg), dtype=torch.float32)
    for g in range(G):
        experts = torch.arange(g * per_group, (g + 1) * per_group)
        for i, sub in enumerate(torch.tensor_split(experts, mg)):
            stacked = W[sub].to(device, torch.float32).reshape(-1, d)  # [k*p, d]
            U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
            k = min(r, S.numel())
            B[g, i, :k] = Vh[:k].cpu()
            A[sub, :, :k] = (U[:, :k] * S[:k]).reshape(len(sub), p, k).cpu()
            alpha[sub, i] = 1.0
    return MoBEFactors(A, B, alpha, 1.0, spec.activation)
