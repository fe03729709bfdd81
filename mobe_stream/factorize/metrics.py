"""Reconstruction error and parameter budgets."""

from __future__ import annotations

import torch

from .model import MoBEFactors


def relative_error(W: torch.Tensor, factors: MoBEFactors, expert_batch: int | None = None) -> float:
    """||W - Ŵ||_F / ||W||_F over the whole layer, a batch of experts at a time (default: about
    64 MiB of reconstruction per batch) so it never builds a second full-layer tensor."""
    E, p, d = W.shape
    expert_batch = expert_batch or max(1, (64 * 2**20) // (4 * p * d))
    num = den = 0.0
    for e0 in range(0, W.shape[0], expert_batch):
        idx = torch.arange(e0, min(W.shape[0], e0 + expert_batch))
        Wb = W[idx].float()
        num += float(((factors.reconstruct(idx) - Wb) ** 2).sum())
        den += float((Wb**2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def param_fraction(E: int, p: int, d: int, m: int, r: int) -> float:
    """Parameters of a gate+up+down MoE layer after MoBE of gate and up, as a fraction of before
    (α ignored): 1/3 + 2r/(3d) + 2mr/(3Ep)."""
    return 1 / 3 + 2 * r / (3 * d) + 2 * m * r / (3 * E * p)


def expert_cut(E: int, p: int, d: int, m: int, r: int) -> float:
    """Exact fraction of gate/up/down expert parameters removed (α included)."""
    before = 3 * E * p * d
    after = E * p * d + 2 * (E * p * r + m * r * d + E * m)
    return 1 - after / before


def choose_bases_rank(E: int, p: int, d: int, reduction: float, groups: int = 1, rank: int | None = None,
                      num_bases: int | None = None) -> tuple[int, int]:
    """(m, r) that removes at least `reduction` of the expert parameters.

    Prefers the paper's r = p and the most bases that still meet the target (more bases = lower
    error); lowers r only when even m = groups cannot meet it.
    """
    if not 0 < reduction < 1:
        raise ValueError(f"reduction must be between 0 and 1, got {reduction}")
    ranks = [rank] if rank else [p] + [x for x in (p * 3 // 4, p // 2, p // 4, p // 8) if x >= 1]
    for r in ranks:
        if num_bases:
            if num_bases % groups == 0 and expert_cut(E, p, d, num_bases, r) >= reduction - 1e-12:
                return num_bases, r
            continue
        best = None
        m = groups
        while m <= E and expert_cut(E, p, d, m, r) >= reduction - 1e-12:
            best = m
            m += groups
        if best is not None:
            return best, r
    raise ValueError(f"cannot cut {reduction:.0%} of expert parameters with "
                     f"{'rank ' + str(rank) if rank else 'any rank'}"
                     f"{' and ' + str(num_bases) + ' bases' if num_bases else ''} "
                     f"(E={E}, p={p}, d={d}, groups={groups}); lower --reduction or --rank")


def working_set_bytes(E: int, p: int, d: int, m: int, r: int, groups: int = 1, device: str = "cpu") -> dict[str, int]:
    """Peak bytes of one projection's fit: host (targets, A + Adam moments + best + scratch, plus the
    batch temporaries when computing on the CPU) and device (bases state + one batch, or everything)."""
    from .solver_base import CPU_BATCH_BYTES

    W = 4 * E * p * d
    A = 4 * E * p * r
    shared = 5 * 4 * m * r * d
    state = W + 5 * A + shared  # targets, A (+2 moments, best, scratch), bases state
    sketch = 4 * E * min(64, p) * d  # clustered init's row sketches (cluster.py), freed before the fit
    host = max(state + (CPU_BATCH_BYTES if device == "cpu" else 0), W + A + sketch)
    return {"host": int(host), "device": int(state)}  # device: all resident; less is streamed in batches
