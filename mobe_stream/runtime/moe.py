"""Routers (one small function per published rule, `ROUTE`) and the routed-expert loop.

Experts are reached through a small interface so that the same loop runs original weights (per
expert or fused storage, in the family's fused form) and MoBE factors (mixed bases built only for
the routed experts). What an expert computes after its gate/up projections (`ExpertMath`): the GLU
(SwiGLU, or gpt-oss's clamped form) and, where the family has them, the experts' biases.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn.functional as F

from ..checkpoint.families import BIAS_SUFFIX, EXPERTS_MODULE, FusedForm, fused_name, per_expert_name
from .config import GPT_OSS_ALPHA, RuntimeConfig
from .unit_weights import UnitWeights
from .weights import experts_per_batch

GATE_UP_BIAS = fused_name(EXPERTS_MODULE, "gate_proj") + BIAS_SUFFIX  # [E, 2p], in the fused form's order
DOWN_BIAS = fused_name(EXPERTS_MODULE, "down_proj") + BIAS_SUFFIX  # [E, d]


class ExpertBank(Protocol):
    max_batch: int  # most experts per batch (bounds a bank's per-batch temporaries)

    def prepare(self, experts: list[int]) -> None:
        """Called once per forward with the experts routed to (offloaded stores fetch them here)."""

    def apply(self, experts: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Experts `experts` [n] on their rows x [n, C, d] (one batch, padded to C rows each) -> [n, C, d]."""


def silu_glu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(g) * u


def clamped_glu(g: torch.Tensor, u: torch.Tensor, limit: float) -> torch.Tensor:
    """gpt-oss: gate clamped above, up clamped both ways, g * sigmoid(alpha g) * (u + 1)."""
    g = g.clamp(max=limit)
    u = u.clamp(min=-limit, max=limit)
    return g * torch.sigmoid(g * GPT_OSS_ALPHA) * (u + 1)


GLU: dict[str, Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]] = {"silu": silu_glu, "clamped": clamped_glu}


@dataclass(frozen=True)
class ExpertMath:
    """form: the fused form of stacked gate_up/down tensors (None: per-expert storage)."""
    form: FusedForm | None
    glu: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor] = silu_glu
    limit: float = 7.0


class OriginalExperts:
    """Expert weights as stored: `experts.E.{gate,up,down}_proj.weight` or fused `gate_up_proj`/`down_proj`.
    Only the routed experts' matrices are ever read, so only they are dequantized (FP8 sources), in
    one batched pass per forward."""

    def __init__(self, w: UnitWeights, p: int, math: ExpertMath, hidden: int):
        self.w, self.p, self.math = w, p, math
        self.form = math.form  # the checkpoint's layout, detected once by the family adapter
        per = experts_per_batch(3 * p * hidden * w.dtype.itemsize)
        self.max_batch = per if w.max_batch is None else min(per, w.max_batch)

    def prepare(self, experts: list[int]) -> None:
        self.w.prepare_experts(experts)

    def gate_up(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up weights of experts ids: two [n, p, d] batches."""
        if self.form is not None:
            return self.form.split(self.w.experts(fused_name(EXPERTS_MODULE, "gate_proj"), ids))
        es = ids.tolist()
        return tuple(self.w.stack([per_expert_name(EXPERTS_MODULE, e, pr) for e in es])  # type: ignore[return-value]
                     for pr in ("gate_proj", "up_proj"))

    def down(self, ids: torch.Tensor) -> torch.Tensor:
        """Down weights of experts ids: [n, d, p]."""
        if self.form is not None:
            return self.form.down(self.w.experts(fused_name(EXPERTS_MODULE, "down_proj"), ids))
        return self.w.stack([per_expert_name(EXPERTS_MODULE, e, "down_proj") for e in ids.tolist()])

    def pre(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gate and up pre-activations (biases not yet added) of x [n, C, d]: two [n, C, p]."""
        gate, up = self.gate_up(ids)
        return torch.bmm(x, gate.mT), torch.bmm(x, up.mT)

    def finish(self, ids: torch.Tensor, g: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Biases (kept exactly as stored), the GLU and down_proj: [n, C, p] x 2 -> [n, C, d]."""
        if GATE_UP_BIAS in self.w:
            assert self.form is not None, "expert biases come with fused storage"
            bg, bu = self.form.split_bias(self.w.experts(GATE_UP_BIAS, ids))
            g, u = g + bg[:, None], u + bu[:, None]
        y = torch.bmm(self.math.glu(g, u, self.math.limit), self.down(ids).mT)
        if DOWN_BIAS in self.w:
            y = y + self.w.experts(DOWN_BIAS, ids)[:, None]
        return y

    def apply(self, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.finish(ids, *self.pre(ids, x))


Routing = tuple[torch.Tensor, torch.Tensor]  # weights [T, k], expert ids [T, k]


def _renorm(weights: torch.Tensor, cfg: RuntimeConfig) -> torch.Tensor:
    return weights / weights.sum(dim=-1, keepdim=True).clamp(min=cfg.norm_min) if cfg.norm_topk_prob else weights


def route_softmax(x: torch.Tensor, w: UnitWeights, cfg: RuntimeConfig) -> Routing:
    """Qwen2/3-MoE, Mixtral, OLMoE: softmax over all experts in fp32, top-k, optionally renormalised."""
    logits = F.linear(x, w["mlp.gate.weight"])
    probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
    weights, idx = probs.topk(cfg.top_k, dim=-1)
    return _renorm(weights, cfg).to(logits.dtype), idx


def _grouped_topk(choice: torch.Tensor, cfg: RuntimeConfig, group_score) -> torch.Tensor:
    """Top-k expert ids of `choice` [T, E] among the topk_group best of n_group groups."""
    E, G = cfg.num_experts, cfg.n_group
    if G > 1:
        keep = group_score(choice.view(-1, G, E // G)).topk(cfg.topk_group, dim=-1).indices
        group_mask = torch.zeros((choice.shape[0], G), dtype=torch.bool, device=choice.device).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // G, dim=1), float("-inf"))
    return choice.topk(cfg.top_k, dim=-1).indices


def route_sigmoid_grouped(x: torch.Tensor, w: UnitWeights, cfg: RuntimeConfig) -> Routing:
    """DeepSeek-V3 noaux_tc (also GLM-4.5, MiniMax-M2): sigmoid scores; the bias only steers the choice
    (groups ranked by their top-2 sum, best topk_group kept), weights are the unbiased scores,
    renormalised and scaled."""
    scores = F.linear(x.float(), w["mlp.gate.weight"].float()).sigmoid()
    bias = w.get("mlp.gate.e_score_correction_bias")
    choice = scores if bias is None else scores + bias.float().reshape(-1)
    idx = _grouped_topk(choice, cfg, lambda g: g.topk(2, dim=-1).values.sum(-1))
    weights = scores.gather(1, idx)
    return _renorm(weights, cfg) * cfg.routed_scaling_factor, idx


def route_softmax_grouped(x: torch.Tensor, w: UnitWeights, cfg: RuntimeConfig) -> Routing:
    """DeepSeek-V2: softmax in fp32, greedy top-k (or within the topk_group groups of highest max
    score), weights scaled by routed_scaling_factor, not renormalised."""
    scores = F.linear(x.float(), w["mlp.gate.weight"].float()).softmax(dim=-1)
    idx = _grouped_topk(scores, cfg, lambda g: g.max(dim=-1).values)
    return scores.gather(1, idx) * cfg.routed_scaling_factor, idx


def route_softmax_biased(x: torch.Tensor, w: UnitWeights, cfg: RuntimeConfig) -> Routing:
    """ERNIE-4.5: softmax in fp32; the correction bias steers the choice; weights renormalised
    (sum floored at moe_norm_min)."""
    probs = F.linear(x.float(), w["mlp.gate.weight"].float()).softmax(dim=-1)
    idx = (probs + w["mlp.gate.e_score_correction_bias"].float().reshape(-1)).topk(cfg.top_k, dim=-1).indices
    return _renorm(probs.gather(1, idx), cfg).to(x.dtype), idx


def route_topk_softmax(x: torch.Tensor, w: UnitWeights, cfg: RuntimeConfig) -> Routing:
    """gpt-oss: logits with the router's bias, top-k of the logits, softmax over those k."""
    logits = F.linear(x, w["mlp.gate.weight"], w["mlp.gate.bias"])
    top, idx = logits.topk(cfg.top_k, dim=-1)
    return torch.softmax(top, dim=-1), idx


def route_topk_sigmoid(x: torch.Tensor, w: UnitWeights, cfg: RuntimeConfig) -> Routing:
    """Llama-4: top-k of the logits, sigmoid of those (in fp32); the weights scale the experts' inputs."""
    top, idx = F.linear(x, w["mlp.gate.weight"]).topk(cfg.top_k, dim=-1)
    return top.float().sigmoid().to(x.dtype), idx


ROUTE: dict[str, Callable[[torch.Tensor, UnitWeights, RuntimeConfig], Routing]] = {
    "softmax": route_softmax, "sigmoid_grouped": route_sigmoid_grouped, "softmax_grouped": route_softmax_grouped,
    "softmax_biased": route_softmax_biased, "topk_softmax": route_topk_softmax,
    "topk_sigmoid": route_topk_sigmoid,
}


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


def run_experts(x: torch.Tensor, weights: torch.Tensor, idx: torch.Tensor, bank: ExpertBank,
                weights_on_inputs: bool = False) -> torch.Tensor:
    """sum_k weights[t, k] * expert_{idx[t, k]}(x[t]) over rows t of x [T, d] (weights_on_inputs:
    sum_k expert_{idx[t, k]}(weights[t, k] * x[t]), Llama-4), one batched matmul chain per batch of
    experts with similar token counts (expert_batches)."""
    out = torch.zeros_like(x)
    batches = expert_batches(idx, weights, bank.max_batch)
    bank.prepare(torch.cat([b.experts for b in batches]).tolist())
    for b in batches:
        if weights_on_inputs:
            y = bank.apply(b.experts, x[b.rows] * b.weights[..., None].to(x.dtype))
        else:
            y = bank.apply(b.experts, x[b.rows]) * b.weights[..., None]
        out.index_add_(0, b.rows.flatten(), y.flatten(0, 1).to(x.dtype))
    return out
