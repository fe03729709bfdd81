"""One unit's weights as stored; block-scaled FP8 ones are dequantized when the compute reads them.

An FP8 weight stays 1 byte per parameter in RAM, on the GPU and on the way there, next to its fp32
`_scale_inv`; reading it (`w[name]`) returns a fresh compute-dtype copy made by
`checkpoint.fp8.dequantize` (fp32, rounded once), so logits equal those of dequantizing at load.
The copy lives only while the op that asked for it runs: one attention matrix, or one expert's
three projections. `expert(name, e)` dequantizes a single expert of a fused `[E, ...]` tensor, so a
forward pays only for the experts it routes to. Any stored tensor with a `_scale_inv` companion
takes this path (MoBE factors included, should they ever be stored in FP8).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch

from ..checkpoint import fp8


class UnitWeights(Mapping[str, torch.Tensor]):
    max_batch: int | None = None  # most experts a forward may hold at once (expert_store.ExpertUnit: staging)

    def __init__(self, tensors: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], dtype: torch.dtype,
                 block: tuple[int, int] = fp8.DEFAULT_BLOCK):
        """tensors: relative name -> tensor as held (FP8 as stored, others already in their compute
        dtype); scales: relative name of an FP8 tensor -> its block scale; dtype: dequantized dtype."""
        self.tensors, self.scales, self.dtype, self.block = tensors, scales, dtype, block

    def __getitem__(self, rel: str) -> torch.Tensor:
        t = self.tensors[rel]
        s = self.scales.get(rel)
        return t if s is None else fp8.dequantize_stack(t, s, self.block, self.dtype)

    def expert(self, rel: str, e: int) -> torch.Tensor:
        """Slice e of a stacked `[E, ...]` tensor (fused experts), dequantizing only that slice."""
        t = self.tensors[rel]
        s = self.scales.get(rel)
        return t[e] if s is None else fp8.dequantize(t[e], s[e], self.block, self.dtype)

    def experts(self, rel: str, ids: torch.Tensor) -> torch.Tensor:
        """Slices `ids` of a stacked `[E, ...]` tensor as one `[n, ...]` batch; FP8 slices are
        dequantized in one vectorized pass (a per-expert dequantize call would dominate a decode step)."""
        t = self.tensors[rel]
        q = t.index_select(0, ids.to(t.device))
        s = self.scales.get(rel)
        return q if s is None else self._dequant(q, s.index_select(0, ids.to(s.device)))

    def stack(self, rels: list[str]) -> torch.Tensor:
        """Per-expert tensors (the same shape) as one `[n, ...]` batch, FP8 ones dequantized together."""
        q = torch.stack([self.tensors[r] for r in rels])
        if rels[0] not in self.scales:
            return q
        return self._dequant(q, torch.stack([self.scales[r] for r in rels]))

    def _dequant(self, q: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
        return fp8.dequantize_batch(q, s, self.block, self.dtype)

    def shape(self, rel: str) -> torch.Size:
        """Shape of a held tensor as stored (a stacked `[E, ...]` one counts all E experts)."""
        return self.tensors[rel].shape

    def prepare_experts(self, experts: list[int]) -> None:
        """Called once per MoE forward with the routed experts; in memory nothing is to be done
        (the expert-offloaded unit, expert_store.ExpertUnit, fetches the missing ones here)."""

    def __contains__(self, rel: object) -> bool:  # Mapping's default would dequantize
        return rel in self.tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self.tensors)

    def __len__(self) -> int:
        return len(self.tensors)

    def stored(self) -> Iterator[torch.Tensor]:
        """Every tensor held, scales included (for moving, pinning, stream bookkeeping)."""
        yield from self.tensors.values()
        yield from self.scales.values()

    def nbytes(self) -> int:
        """Bytes held (FP8 weights at 1 byte per parameter plus their scales)."""
        return sum(t.numel() * t.element_size() for t in self.stored())

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> UnitWeights:
        """The same weights with fn applied to every held tensor (e.g. `.to(device)`), still stored."""
        return UnitWeights({k: fn(v) for k, v in self.tensors.items()}, {k: fn(v) for k, v in self.scales.items()},
                           self.dtype, self.block)
