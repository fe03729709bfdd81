"""Grouped-SVD initialisation (as published; `scaled`, the default, see init_scaled): each basis
starts as the top-r right singular vectors of a contiguous sub-group of experts, A_e from the
matching left vectors, α one-hot.

Uses torch.linalg.svd (economy) of the stacked [k·p, d] sub-group matrix in fp32 on the solver's
device; no Gram/eigh route (it squares the condition number, and one SVD per sub-group is a
one-off cost next to thousands of solver passes). Bases beyond the available rank are zero.

`init_fitted` starts from the same SVD bases but makes the start as exact as the grouped SVD
allows: the activation's slope at 0 is undone (silu'(0) = 1/2, so bases are doubled), the own-basis
logit is large enough that softmax is nearly one-hot, and A is the exact least-squares fit for
those mixed bases. The published start (softmax of a one-hot logit gives the own basis only ~28%
weight with 8 bases) begins several times further from the targets.
"""

from __future__ import annotations

import torch

from .cluster import balanced_clusters, similarity
from .lstsq import solve_A
from .model import MoBEFactors, MoBESpec, mixed_bases
from .targets import Targets

INITS = ("scaled", "paper", "clustered", "fitted")
SLOPE_AT_ZERO = {"silu": 0.5, "tanh": 1.0, "identity": 1.0}
BASIS_RMS = 0.5  # `scaled`: entry RMS of every basis at the start (z-scored targets)
OWN_LOGIT = 3.0  # `scaled`: logit of an expert's own basis (softmax weight 0.74 with 8 bases)


def init_grouped_svd(W: torch.Tensor | Targets, spec: MoBESpec, device: str | torch.device = "cpu",
                     cluster: bool = False, seed: int = 0, need_A: bool = True) -> MoBEFactors:
    """Each basis from the SVD of one sub-group of experts: contiguous index runs (the paper), or
    with `cluster` balanced sets of similar experts (cluster.py), same sizes either way. `seed`
    draws the clustering's random row sketch (the only random choice of any init). Without
    `need_A` (the variable-projection solver solves A itself) A is a zero view that holds no memory
    (for Kimi-K2 it would be 6.4 GB of host RAM per projection)."""
    T = Targets.of(W)
    E, p, d = T.shape
    G, mg, r = spec.groups, spec.bases_per_group, spec.rank
    if E % G:
        raise ValueError(f"{E} experts cannot be split into {G} groups")
    per_group = E // G
    if mg > per_group:
        raise ValueError(f"{mg} bases per group need at least as many experts per group (have {per_group})")
    A = torch.zeros((E, p, r), dtype=torch.float32) if need_A else torch.zeros((), dtype=torch.float32).expand(E, p, r)
    B = torch.zeros((G, mg, r, d), dtype=torch.float32)
    alpha = torch.zeros((E, mg), dtype=torch.float32)
    for g in range(G):
        experts = torch.arange(g * per_group, (g + 1) * per_group)
        subs = list(torch.tensor_split(experts, mg))
        if cluster and mg > 1:
            sim = similarity(T.slice(int(experts[0]), int(experts[-1]) + 1), device, seed=seed)
            subs = [experts[c] for c in balanced_clusters(sim, [len(s) for s in subs])]
        for i, sub in enumerate(subs):
            stacked = T.take(sub).to(device).batch().reshape(-1, d)  # [k*p, d] fp32
            U, S, Vh = torch.linalg.svd(stacked, full_matrices=False)
            k = min(r, S.numel())
            B[g, i, :k] = Vh[:k].cpu()
            if need_A:
                A[sub, :, :k] = (U[:, :k] * S[:k]).reshape(len(sub), p, k).cpu()
            alpha[sub, i] = 1.0
    return MoBEFactors(A, B, alpha, 1.0, spec.activation)


def init_fitted(W: torch.Tensor | Targets, spec: MoBESpec, device: str | torch.device = "cpu", logit: float = 8.0,
                expert_batch: int = 16) -> MoBEFactors:
    """Grouped-SVD bases through the activation's inverse slope, near one-hot α, least-squares A."""
    T = Targets.of(W)
    f = init_grouped_svd(T, spec, device, need_A=False)
    B = f.B / SLOPE_AT_ZERO[spec.activation]
    alpha = f.alpha * logit
    return MoBEFactors(_lstsq_A(T, B, alpha, spec, device, expert_batch), B, alpha, 1.0, spec.activation)


def _lstsq_A(T: Targets, B: torch.Tensor, alpha: torch.Tensor, spec: MoBESpec, device: str | torch.device,
             expert_batch: int) -> torch.Tensor:
    """The least-squares A [E, p, r] for fixed bases and logits, a batch of experts at a time."""
    E, p, _ = T.shape
    A = torch.empty((E, p, spec.rank), dtype=torch.float32)
    Bd = B.to(device)
    for e0 in range(0, E, expert_batch):
        e1 = min(E, e0 + expert_batch)
        M = mixed_bases(alpha[e0:e1].to(device), Bd, range(e0, e1), E, spec.activation)
        A[e0:e1] = solve_A(T.slice(e0, e1).to(device).batch(), M).cpu()
    return A


def init_scaled(W: torch.Tensor | Targets, spec: MoBESpec, device: str | torch.device = "cpu",
                need_A: bool = True, expert_batch: int = 16) -> MoBEFactors:
    """The published grouped-SVD bases, each rescaled to an entry RMS of BASIS_RMS, own-basis logit
    OWN_LOGIT, and (when asked for) the least-squares A for those mixed bases.

    Why: SVD rows have unit norm, so a basis entry starts at ~1/sqrt(d) (0.06 for d=256, 0.012 for
    Kimi-K2's 7168): the activation sits in its linear range and Adam, whose steps are ~lr per entry
    whatever the gradient's size, spends its first thousands of steps growing B into the range where
    the activation does anything. The reference code gets there by accident (its initial A is std
    times too small, so B grows to compensate). An RMS fixed in absolute terms also gives lr one
    meaning for every hidden size. BASIS_RMS and OWN_LOGIT were measured on a trained model (CHANGELOG,
    issue 12's note): RMS 0.3-0.9 are equally good, 0.06 (the paper) and 1.9 worse; logit 3 beats 1 and 6.
    """
    T = Targets.of(W)
    f = init_grouped_svd(T, spec, device, need_A=False)
    rms = f.B.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    B = torch.where(rms > 0, f.B * (BASIS_RMS / rms.clamp_min(1e-30)), f.B)
    alpha = f.alpha * OWN_LOGIT
    A = _lstsq_A(T, B, alpha, spec, device, expert_batch) if need_A else f.A
    return MoBEFactors(A, B, alpha, 1.0, spec.activation)


def initial_factors(W: torch.Tensor | Targets, spec: MoBESpec, method: str = "paper",
                    device: str | torch.device = "cpu", seed: int = 0, need_A: bool = True) -> MoBEFactors:
    if method == "paper":
        return init_grouped_svd(W, spec, device, need_A=need_A)
    if method == "clustered":
        return init_grouped_svd(W, spec, device, cluster=True, seed=seed, need_A=need_A)
    if method == "fitted":
        return init_fitted(W, spec, device)
    if method == "scaled":
        return init_scaled(W, spec, device, need_A=need_A)
    raise ValueError(f"unknown init {method!r}; use one of {', '.join(INITS)}")
