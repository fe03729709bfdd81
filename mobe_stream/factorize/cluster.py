"""Which experts share a basis at the start: balanced clusters by row-space similarity.

The published init gives each basis a *contiguous* run of expert indices. Expert numbering in a
trained checkpoint carries no similarity, so those runs mix unrelated experts and the SVD bases
start far from what any of them needs. Here the experts of each format group are split into the
same number of equally sized sets (sizes as `tensor_split` gives them), but by similarity.

Similarity of experts i, j is the energy-weighted overlap of their row spaces,
<W_iᵀW_i, W_jᵀW_j> / (‖W_iᵀW_i‖‖W_jᵀW_j‖), estimated from a seeded Gaussian row sketch
Z = S W (k×d): cost E·k·p·d for the sketches plus E²·k²·d for the pairs, small next to the SVDs.
Clustering is balanced kernel k-means with greedy capacity-limited assignment: deterministic.
"""

from __future__ import annotations

import torch

from .targets import Targets

SKETCH_ROWS = 64


def similarity(W: torch.Tensor | Targets, device: str | torch.device = "cpu", rows: int = SKETCH_ROWS,
               seed: int = 0) -> torch.Tensor:
    """[E, E] row-space similarity in [0, 1] (1 on the diagonal), fp32 on the CPU."""
    T = Targets.of(W)
    E, p, d = T.shape
    k = min(rows, p)
    S = torch.randn((k, p), generator=torch.Generator().manual_seed(seed)).to(device) / k**0.5
    Z = torch.stack([S @ T.slice(e, e + 1).to(device).batch()[0] for e in range(E)])  # [E, k, d]
    sim = torch.empty((E, E), dtype=torch.float64, device=device)
    for i in range(E):  # one row of pairs at a time ([E-i, k, k] temporaries), mirrored
        row = (torch.matmul(Z[i], Z[i:].transpose(1, 2)) ** 2).sum(dim=(1, 2)).double()
        sim[i, i:] = row
        sim[i:, i] = row
    norm = sim.diagonal().clamp_min(1e-30).sqrt()
    return (sim / norm[:, None] / norm[None, :]).float().cpu()


def balanced_clusters(sim: torch.Tensor, sizes: list[int], iters: int = 20) -> list[torch.Tensor]:
    """Partition experts 0..E-1 into len(sizes) sets of exactly these sizes, similar experts together."""
    n = len(sizes)
    # farthest-point seeds: start from the expert most similar to all, then least similar to the chosen
    seeds = [int(sim.sum(1).argmax())]
    while len(seeds) < n:
        closest = sim[:, seeds].max(dim=1).values
        closest[seeds] = float("inf")
        seeds.append(int(closest.argmin()))
    score = sim[:, seeds].clone()  # [E, n]
    assign: torch.Tensor | None = None
    for _ in range(iters):
        new = _greedy_assign(score, sizes)
        if assign is not None and torch.equal(new, assign):
            break
        assign = new
        score = torch.stack([sim[:, assign == c].mean(dim=1) for c in range(n)], dim=1)
    assert assign is not None, "iters must be >= 1"
    return [torch.nonzero(assign == c).flatten() for c in range(n)]


def _greedy_assign(score: torch.Tensor, sizes: list[int]) -> torch.Tensor:
    """Each expert to its best cluster that still has room, most confident pairs first."""
    E, n = score.shape
    order = torch.argsort(score.flatten(), descending=True, stable=True).tolist()
    room = list(sizes)
    assign = torch.full((E,), -1, dtype=torch.long)
    left = E
    for flat in order:
        e, c = divmod(flat, n)
        if assign[e] < 0 and room[c] > 0:
            assign[e] = c
            room[c] -= 1
            left -= 1
            if not left:
                break
    return assign
