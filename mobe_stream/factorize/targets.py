"""A projection's targets as stored, scaled on the fly: FP8 + block scales, bf16, fp16 or fp32.

Why not fp32: one gate or up projection of a Kimi-K2 layer is 5.6 G elements, 22.5 GB as fp32
but 5.6 GB as its FP8 source (+1.4 MB of scales) or 11.3 GB as bf16. Kept in the source's own
precision the targets fit on an 80 GB card beside the solver's state, so a step never copies them
over PCIe; each expert batch is dequantized and z-scored on the device inside the step (one
elementwise pass over the batch, next to the four matmuls over it that follow). The values are the
source's: FP8 is dequantized as the format says (fp32 product of code and block scale, 1/std folded
into the per-block scale, so within one rounding of an fp32 copy's z-scored values); bf16/fp16/fp32
are widened and scaled in fp32.
"""

from __future__ import annotations

import math

import torch

from ..checkpoint.fp8 import DEFAULT_BLOCK, FP8_DTYPE, dequantize_batch, scale_shape

STD_CHUNK = 16  # experts per chunk of the std pass (fp32 temporaries of 16 experts)


class Targets:
    """[E, p, d] targets: `data` in its storage dtype (+ `scale_inv` [E, sm, sn] when FP8), times
    `scale`. `batch(e0, e1)` gives the fp32 scaled experts e0..e1 on the data's device."""

    def __init__(self, data: torch.Tensor, scale_inv: torch.Tensor | None = None,
                 block: tuple[int, int] = DEFAULT_BLOCK, scale: float = 1.0):
        if data.dim() != 3:
            raise ValueError(f"targets must be [experts, rows, cols], got shape {tuple(data.shape)}")
        if (data.dtype == FP8_DTYPE) != (scale_inv is not None):
            raise ValueError("FP8 targets need their block scales (and only FP8 targets have them)")
        if scale_inv is not None and tuple(scale_inv.shape) != scale_shape(tuple(data.shape), block):
            raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match targets {tuple(data.shape)}")
        self.data, self.scale_inv, self.scale = data, scale_inv, float(scale)
        self.block: tuple[int, int] = (int(block[0]), int(block[1]))
        # (count, sum, sum of squares) of the stored values at scale 1, shared with scaled() and to()
        # copies: one pass over a projection serves the NaN check, the std and the mean square
        # (Kimi-K2: each pass dequantizes 5.6 G values on the host, tens of seconds)
        self._raw: list[tuple[float, float, float]] = []

    @classmethod
    def of(cls, W: torch.Tensor | Targets) -> Targets:
        return W if isinstance(W, Targets) else cls(W)

    @property
    def shape(self) -> tuple[int, int, int]:
        E, p, d = self.data.shape
        return E, p, d

    @property
    def device(self) -> torch.device:
        return self.data.device

    @property
    def dtype(self) -> torch.dtype:
        return self.data.dtype

    @property
    def nbytes(self) -> int:
        n = self.data.numel() * self.data.element_size()
        return n + (0 if self.scale_inv is None else self.scale_inv.numel() * 4)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] + ([] if self.scale_inv is None else [self.scale_inv])

    def slice(self, e0: int, e1: int) -> Targets:
        """Experts e0..e1 as stored (views)."""
        s = None if self.scale_inv is None else self.scale_inv[e0:e1]
        return Targets(self.data[e0:e1], s, self.block, self.scale)

    def take(self, idx: torch.Tensor) -> Targets:
        """The experts `idx` (any order) as stored: a gathered copy."""
        idx = idx.to(self.data.device)
        s = None if self.scale_inv is None else self.scale_inv[idx]
        return Targets(self.data[idx], s, self.block, self.scale)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> Targets:
        s = None if self.scale_inv is None else self.scale_inv.to(device, non_blocking=non_blocking)
        return self._sharing(Targets(self.data.to(device, non_blocking=non_blocking), s, self.block, self.scale))

    def scaled(self, scale: float) -> Targets:
        return self._sharing(Targets(self.data, self.scale_inv, self.block, scale))

    def _sharing(self, other: Targets) -> Targets:
        other._raw = self._raw  # same values: same statistics
        return other

    def batch(self, e0: int = 0, e1: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[e1-e0, p, d] = stored value · scale in `dtype` (fp32, or bf16 for a bf16 step: computed
        in fp32, rounded once), a fresh tensor on the data's device."""
        e1 = self.shape[0] if e1 is None else e1
        if self.scale_inv is not None:  # `scale` folds into the block scales: one pass over the batch, not two
            return dequantize_batch(self.data[e0:e1], self.scale_inv[e0:e1] * self.scale, self.block, dtype)
        if dtype != torch.float32 and self.data.dtype == dtype:  # one pass: scaled in fp32, rounded once
            return self.data[e0:e1].mul(self.scale)
        out = self.data[e0:e1].to(torch.float32, copy=True)
        return (out.mul_(self.scale) if self.scale != 1.0 else out).to(dtype)

    def dense(self) -> torch.Tensor:
        """All of it as fp32 (for closed-form baselines and small tools; the solvers never call it)."""
        return self.batch()

    def _sums(self) -> tuple[float, float, float]:
        """(count, sum, sum of squares) of the stored values at scale 1, in float64, a chunk of
        experts at a time (never more than STD_CHUNK experts in fp32); computed once."""
        if not self._raw:
            raw = Targets(self.data, self.scale_inv, self.block, 1.0)
            E = self.shape[0]
            n = s1 = s2 = 0.0
            for e0 in range(0, E, STD_CHUNK):
                x = raw.batch(e0, min(E, e0 + STD_CHUNK)).double()
                n += x.numel()
                s1 += float(x.sum())
                s2 += float((x * x).sum())
            self._raw.append((n, s1, s2))
        return self._raw[0]

    def std(self) -> float:
        """Std over all elements as read (unbiased, as torch.std)."""
        n, s1, s2 = self._sums()
        if n < 2:
            return 0.0
        return math.sqrt(max(0.0, (s2 - s1 * s1 / n) / (n - 1))) * abs(self.scale)

    def mean_square(self) -> float:
        """Mean of the squared values as read: a solver's loss over it is the squared relative error."""
        n, _, s2 = self._sums()
        return s2 / max(n, 1.0) * self.scale * self.scale

    def weighted_mean_square(self, metric) -> float:
        """Σ_e tr(W_e H_e W_eᵀ) / N for an input metric (metric.py): the calibrated loss of a zero
        fit, so loss over it is the weighted squared relative error. One pass, STD_CHUNK experts at a time."""
        E = self.shape[0]
        total = 0.0
        for e0 in range(0, E, STD_CHUNK):
            e1 = min(E, e0 + STD_CHUNK)
            total += float(metric.slice(e0, e1).quadratic(self.batch(e0, e1)))
        return total / max(math.prod(self.shape), 1)

    def first_nonfinite(self) -> int | None:
        """Index of the first expert holding a NaN/Inf, or None (finite sums: no scan needed)."""
        if all(math.isfinite(v) for v in self._sums()):
            return None
        for e in range(self.shape[0]):
            if not bool(torch.isfinite(self.batch(e, e + 1)).all()):
                return e
        return None


def zscored(W: torch.Tensor | Targets) -> tuple[Targets, float]:
    """The paper's z-scoring (divide by the std over all experts of the layer) without a copy:
    (targets that read back scaled, std). A constant layer keeps std 1."""
    T = Targets.of(W)
    std = T.scaled(1.0).std()
    if not std > 0 or not math.isfinite(std):
        std = 1.0
    return T.scaled(1.0 / std), std
