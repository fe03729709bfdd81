"""Routers (Qwen3 softmax top-k; DeepSeek sigmoid + bias, grouped top-k) and the routed-expert loop.

Experts are reached through a small interface so that the same loop runs original weights (per
expert or fused storage) and MoBE factors (mixed bases built only for the routed experts).
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F

from ..checkpoint.families import EXPERTS_MODULE, FUSED, fused_name, per_expert_name
from .config import RuntimeConfig
from .ops import swiglu
from .unit_weights import UnitWeights


class ExpertBank(Protocol):
    def prepare(self, experts: list[int]) -> None:
        """Called once per forward with the experts routed to (MoBE mixes their bases here)."""

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        """Expert e's SwiGLU MLP on rows x [n, d]."""


class OriginalExperts:
    """Expert weights as stored: `experts.E.{gate,up,down}_proj.weight` or fused `gate_up_proj`/`down_proj`.
    Only the routed experts' matrices are ever read, so only they are dequantized (FP8 sources)."""

    def __init__(self, w: UnitWeights, p: int, layout: str):
        self.w, self.p = w, p
        self.fused = layout == FUSED  # the checkpoint's layout, detected once by the family adapter

    def prepare(self, experts: list[int]) -> None:
        self.w.prepare_experts(experts)

    def gate_up(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        if self.fused:
            gu = self.w.expert(fused_name(EXPERTS_MODULE, "gate_proj"), e)
            return gu[: self.p], gu[self.p:]
        return (self.w[per_expert_name(EXPERTS_MODULE, e, "gate_proj")],
                self.w[per_expert_name(EXPERTS_MODULE, e, "up_proj")])

    def down(self, e: int) -> torch.Tensor:
        if self.fused:
            return self.w.expert(fused_name(EXPERTS_MODULE, "down_proj"), e)
        return self.w[per_expert_name(EXPERTS_MODULE, e, "down_proj")]

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up(e)
        return swiglu(x, gate, up, self.down(e))


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


def run_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, bank: ExpertBank) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) over rows t of x [T, d]."""
    out = torch.zeros_like(x)
    flat = idx.flatten()
    order = flat.argsort(stable=True)
    counts = torch.bincount(flat, minlength=1).tolist()
    routed = [e for e, c in enumerate(counts) if c]
    bank.prepare(routed)
    start = 0
    k = idx.shape[1]
    for e, c in enumerate(counts):
        if not c:
            continue
        sel = order[start:start + c]
        start += c
        tok = sel // k
        y = bank(e, x[tok]) * weights.flatten()[sel, None]
        out.index_add_(0, tok, y.to(x.dtype))
    return out
