"""Routers (Qwen3 softmax top-k; DeepSeek sigmoid + bias, grouped top-k) and the routed-expert loop.

Experts are reached through a small interface so that the same loop runs original weights (per
expert or fused storage) and MoBE factors (mixed bases built only for the routed experts).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..checkpoint.families import EXPERTS_MODULE, FUSED, fused_name, per_expert_name
from .config import RuntimeConfig
from .unit_weights import UnitWeights
from .weights import experts_per_batch


class ExpertBank(Protocol):
    max_batch: int  # most experts per batch (bounds a bank's per-batch temporaries)

    def prepare(self, experts: list[int]) -> None:
        """Called once per forward with the experts routed to (offloaded stores fetch them here)."""

    def apply(self, experts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Experts `experts` [n] on their rows x [n, C, d] (one batch, padded to C rows each) -> [n, C, d]."""


class OriginalExperts:
    """Expert weights as stored: `experts.E.{gate,up,down}_proj.weight` or fused `gate_up_proj`/`down_proj`.
    Only the routed experts' matrices are ever read, so only they are dequantized (FP8 sources), in
    one batched pass per forward."""

    def __init__(self, w: UnitWeights, p: int, layout: str, hidden: int):
        self.w, self.p = w, p
        self.fused = layout == FUSED  # the checkpoint's layout, detected once by the family adapter
        per = experts_per_batch(3 * p * hidden * w.dtype.itemsize)
        self.max_batch = per if w.max_batch is None else min(per, w.max_batch)

    def prepare(self, experts: list[int]) -> None:
        self.w.prepare_experts(experts)

    def gate_up(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up weights of experts ids: two [n, p, d] batches."""
        if self.fused:
            gu = self.w.experts(fused_name(EXPERTS_MODULE, "gate_proj"), ids)
            return gu[:, : self.p], gu[:, self.p:]
        es = ids.tolist()
        return tuple(self.w.stack([per_expert_name(EXPERTS_MODULE, e, pr) for e in es])  # type: ignore[return-value]
                     for pr in ("gate_proj", "up_proj"))

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        """Down weights of experts ids: [n, d, p]."""
        if self.fused:
            return self.w.experts(fused_name(EXPERTS_MODULE, "down_proj"), ids)
        return self.w.stack([per_expert_name(EXPERTS_MODULE, e, "down_proj") for e in ids.tolist()])

    def apply(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(ids)
        return batched_swiglu(x, gate, up, self.down(ids))


def batched_swiglu(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """`ops.swiglu` for a batch of experts: x [n, C, d], gate/up [n, p, d], down [n, d, p]."""
    return torch.bmm(F.silu(torch.bmm(x, gate.mT)) * torch.bmm(x, up.mT), down.mT)


def route_softmax(x: torch.Tensor, gate_w: torch.Tensor, cfg: RuntimeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE: softmax over all experts in fp32, top-k, optionally renormalised."""
    logits = F.linear(x, gate_w)
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = probs.topk(cfg.top_k, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), idx


def route_sigmoid_grouped(x: torch.Tensor, gate_w: torch.Tensor, bias: torch.Tensor | None,
                          cfg: RuntimeConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3 noaux_tc: sigmoid scores; the bias only steers the choice (groups ranked by their top-2
    sum, best topk_group kept), weights are the unbiased scores, renormalised and scaled."""
    scores = F.linear(x.float(), gate_w.float()).sigmoid()
    choice = scores if bias is None else scores + bias.float()
    E, G = cfg.num_experts, cfg.n_group
    if G > 1:
        group_scores = choice.view(-1, G, E // G).topk(2, dim=-1).values.sum(-1)
        keep = group_scores.topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
    idx = choice.topk(cfg.top_k, dim=-1).indices
    weights = scores.gather(1, idx)
    if cfg.norm_topk_prob:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    return weights * cfg.routed_scaling_factor, idx


PAD_SLACK = 1.25  # experts whose token counts differ by less than this factor share one padded batch


@dataclass
class ExpertBatch:
    """Routed experts of similar token counts, their rows gathered and padded to C rows each."""
    experts: torch.Tensor  # [n]
    rows: torch.Tensor     # [n, C] row of x for each slot (padding: row 0)
    weights: torch.Tensor  # [n, C] routing weight (padding: 0)


def expert_batches(idx: torch.Tensor, weights: torch.Tensor, max_experts: int | None = None) -> list[ExpertBatch]:
    """Group the (token, expert) assignments of idx [T, k] by expert, experts in batches of similar
    counts (at most PAD_SLACK padding per batch, at most max_experts per batch), with tensor ops
    only: the Python loop is over batches, a handful, never over experts or tokens."""
    k = idx.shape[1]
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat)
    routed = counts.nonzero().flatten()
    c = counts[routed]
    starts = (torch.cumsum(counts, 0) - counts)[routed]
    klass = torch.ceil(torch.log(c.double()) / torch.log(torch.tensor(PAD_SLACK, dtype=torch.float64))).long()
    rows_sorted, w_sorted = order // k, weights.flatten()[order]
    out = []
    for cl in torch.unique(klass).tolist():
        sel = (klass == cl).nonzero().flatten()
        step = len(sel) if max_experts is None else max(1, max_experts)
        for j in range(0, len(sel), step):
            part = sel[j:j + step]
            cc, st = c[part], starts[part]
            pos = torch.arange(int(cc.max()), device=idx.device)
            valid = pos[None, :] < cc[:, None]
            src = torch.where(valid, st[:, None] + pos[None, :], 0)
            out.append(ExpertBatch(routed[part], torch.where(valid, rows_sorted[src], 0),
                                   torch.where(valid, w_sorted[src], 0)))
    return out


def run_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, bank: ExpertBank) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) over rows t of x [T, d], one batched matmul
    chain per batch of experts with similar token counts (expert_batches)."""
    out = torch.zeros_like(x)
    batches = expert_batches(idx, weights, bank.max_batch)
    bank.prepare(torch.cat([b.experts for b in batches]).tolist())
    for b in batches:
        y = bank.apply(b.experts, x[b.rows]) * b.weights[..., None]
        out.index_add_(0, b.rows.flatten(), y.flatten(0, 1).to(x.dtype))
    return out
