"""One projection fitted by several processes: each owns a contiguous run of experts [lo, hi).

Per-expert parameters (α_e, and A_e for Adam) and their Adam moments only ever get gradient from
their own expert, so they stay with the process that owns the expert. The loss normaliser N and
the shared bases B are global: after each pass the pass's loss and B's gradient are summed over all
processes before B's Adam step, so every process takes the same B step and reads the same loss
(best-iterate tracking, `tol` and the stop decisions then agree everywhere). The result equals a
one-process fit up to the summation order of B's gradient (float rounding).

This module names the hooks only; the pipeline provides them over torch.distributed
(pipeline/dist.py), the tests over threads. Factorize code stays free of any process group.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


def expert_bounds(total: int, parts: int, index: int) -> tuple[int, int]:
    """The contiguous expert run [lo, hi) of part `index` of `parts` (sizes differ by at most one)."""
    return total * index // parts, total * (index + 1) // parts


@dataclass(frozen=True)
class ExpertShard:
    """Experts [lo, hi) of `total`, and the collectives a sharded solver needs (all in place or new
    tensors, every process calling each in the same order):

    all_reduce(t): t becomes the sum of every process's t.
    gather(t): t holds this shard's rows of a per-expert tensor; returns all `total` rows in expert order.
    broadcast(t): t becomes process 0's t (the init's bases: an SVD on two GPUs need not round alike).
    main: this process writes what the fit produces (checkpoints, output).
    """

    lo: int
    hi: int
    total: int
    all_reduce: Callable[[torch.Tensor], None]
    gather: Callable[[torch.Tensor], torch.Tensor]
    broadcast: Callable[[torch.Tensor], None]
    main: bool = True

    def __post_init__(self):
        if not 0 <= self.lo <= self.hi <= self.total:
            raise ValueError(f"expert shard [{self.lo}, {self.hi}) does not lie in 0..{self.total}")

    @property
    def size(self) -> int:
        return self.hi - self.lo

    def agree(self, *flags: bool) -> tuple[bool, ...]:
        """Each flag OR-ed over every process (a stop or checkpoint decision), all in one all-reduce."""
        t = torch.tensor([1.0 if f else 0.0 for f in flags])
        self.all_reduce(t)
        return tuple(bool(x > 0) for x in t.tolist())
