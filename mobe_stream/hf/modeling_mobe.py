"""Compact MoBE checkpoints in transformers: `AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)`.

Written by mobe-stream next to a compressed checkpoint (`auto_map` in its config.json). Each family's
own transformers classes are subclassed; only the routed experts' module of the compressed MoE
layers is replaced: gate/up of expert e are A_e act(sum_i softmax(alpha_e)_i B_g(e),i) (MoBE) or
[mean_g(e) +] U_e V_e (the low-rank baselines), applied factored and mixed only for the experts a
forward routes to; down_proj is the original. Parameter names are the checkpoint's tensor names,
so nothing is converted on load. Needs only torch and transformers (not mobe-stream); run, check
or export the checkpoint with mobe-stream itself.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"silu": F.silu, "tanh": torch.tanh}


class _MobeProjection(nn.Module):
    """`<proj>.mobe_A` [E, p, r], `<proj>.mobe_B` [G, m_g, r, d], `<proj>.mobe_alpha` [E, m_g]."""

    def __init__(self, E: int, p: int, d: int, mobe: dict):
        super().__init__()
        r, G = mobe["rank"], mobe.get("groups", 1)
        mg = mobe["num_bases"] // G
        self.per_group, self.act = E // G, str(mobe.get("activation", "silu"))
        self.mobe_A = nn.Parameter(torch.empty(E, p, r))
        self.mobe_B = nn.Parameter(torch.empty(G, mg, r, d))
        self.mobe_alpha = nn.Parameter(torch.empty(E, mg))

    def forward(self, experts: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        """The projection of each routed expert on its rows: bases mixed once per forward (fp32).
        (Called as a module, never through its tensors: accelerate's offload hooks load a module's
        weights in its forward.)"""
        G, mg, r, d = self.mobe_B.shape
        w = torch.softmax(self.mobe_alpha[experts].float(), dim=-1)
        groups = experts // self.per_group
        mixed = torch.empty(len(experts), r * d, dtype=torch.float32, device=self.mobe_B.device)
        for g in torch.unique(groups).tolist():
            sel = (groups == g).nonzero().flatten()
            mixed[sel] = w[sel] @ self.mobe_B[g].reshape(mg, r * d).float()
        M = ACTIVATIONS[self.act](mixed.view(-1, r, d))
        return [F.linear(F.linear(x, M[j].to(x.dtype)), self.mobe_A[e])
                for j, (e, x) in enumerate(zip(experts.tolist(), xs, strict=True))]


class _LowRankProjection(nn.Module):
    """`<proj>.lowrank_U` [E, p, k], `<proj>.lowrank_V` [E, k, d], optional `<proj>.lowrank_mean` [G, p, d]."""

    def __init__(self, E: int, p: int, d: int, mobe: dict):
        super().__init__()
        k, G = mobe["rank"], mobe.get("groups", 1)
        self.lowrank_U = nn.Parameter(torch.empty(E, p, k))
        self.lowrank_V = nn.Parameter(torch.empty(E, k, d))
        self.has_mean = mobe.get("method") == "delta"
        if self.has_mean:
            self.lowrank_mean = nn.Parameter(torch.empty(G, p, d))
        self.per_group = E // G

    def forward(self, experts: torch.Tensor, xs: list[torch.Tensor]) -> list[torch.Tensor]:
        out = []
        for e, x in zip(experts.tolist(), xs, strict=True):
            y = F.linear(F.linear(x, self.lowrank_V[e]), self.lowrank_U[e])
            out.append(y + F.linear(x, self.lowrank_mean[e // self.per_group]) if self.has_mean else y)
        return out


class _Down(nn.Module):
    def __init__(self, d: int, p: int):
        super().__init__()
        self.down_proj = nn.Linear(p, d, bias=False)


class MobeExperts(nn.Module):
    """Drop-in for the family's experts module: forward(hidden_states [T, d], top_k_index, top_k_weights)."""

    def __init__(self, config):
        super().__init__()
        mobe = config.mobe
        if str(mobe.get("dtype", "")).startswith("float8"):
            raise ValueError("this compact checkpoint stores FP8 factors, which this file does not dequantize: "
                             "run it with `mobe-stream generate`, or `mobe-stream export` it")
        E = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts
        p, d = config.moe_intermediate_size, config.hidden_size
        proj = _MobeProjection if mobe.get("method", "mobe") == "mobe" else _LowRankProjection
        self.gate_proj, self.up_proj = proj(E, p, d, mobe), proj(E, p, d, mobe)
        self.fused = mobe.get("layout") == "fused"
        if self.fused:
            self.down_proj = nn.Parameter(torch.empty(E, d, p))
        else:
            for e in range(E):
                self.add_module(str(e), _Down(d, p))
        self.act_fn = ACTIVATIONS[getattr(config, "hidden_act", "silu")]

    def _down(self, e: int, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, self.down_proj[e]) if self.fused else getattr(self, str(e)).down_proj(h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        experts = torch.unique(top_k_index)
        where = [torch.where(top_k_index == e) for e in experts.tolist()]
        xs = [hidden_states[tok] for tok, _ in where]
        gates, ups = self.gate_proj(experts, xs), self.up_proj(experts, xs)
        for e, (tok, pos), g, u in zip(experts.tolist(), where, gates, ups, strict=True):
            y = self._down(e, self.act_fn(g) * u) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


class _HubExperts(nn.Module):
    """An uncompressed MoE layer of a per-expert checkpoint: `E.{gate,up,down}_proj.weight` as stored."""

    def __init__(self, config):
        super().__init__()
        E = config.num_local_experts if hasattr(config, "num_local_experts") else config.num_experts
        p, d = config.moe_intermediate_size, config.hidden_size
        for e in range(E):
            m = nn.Module()
            m.gate_proj, m.up_proj, m.down_proj = (nn.Linear(d, p, bias=False), nn.Linear(d, p, bias=False),
                                                   nn.Linear(p, d, bias=False))
            self.add_module(str(e), m)
        self.act_fn = ACTIVATIONS[getattr(config, "hidden_act", "silu")]

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():
            tok, pos = torch.where(top_k_index == e)
            m, x = getattr(self, str(e)), hidden_states[tok]
            y = m.down_proj(self.act_fn(m.gate_proj(x)) * m.up_proj(x)) * top_k_weights[tok, pos, None]
            out.index_add_(0, tok, y.to(out.dtype))
        return out


def _install(model: nn.Module, config) -> None:
    """Replace the experts of every MoE layer whose stored tensors are not transformers' own layout."""
    compressed = set(config.mobe["layers"])
    per_expert = config.mobe.get("layout") != "fused"
    layers: nn.ModuleList = model.model.layers  # type: ignore[union-attr,assignment]
    for i, layer in enumerate(layers):
        mlp: Any = layer.mlp
        if getattr(mlp, "experts", None) is None:
            continue
        if i in compressed:
            mlp.experts = MobeExperts(config)
        elif per_expert:
            mlp.experts = _HubExperts(config)


def _family(stem: str, model_type: str, config_base: type, model_base: type) -> tuple[type, type]:
    """(config class, model class) of one family: its transformers classes with the experts replaced."""
    config_cls = type(f"{stem}Config", (config_base,), {"model_type": model_type, "__module__": __name__})

    def __init__(self, config):
        model_base.__init__(self, config)
        _install(self, config)
        self.post_init()

    model_cls = type(f"{stem}ForCausalLM", (model_base,), {"config_class": config_cls, "__init__": __init__,
                                                          "__module__": __name__})
    return config_cls, model_cls


MobeQwen3MoeConfig, MobeQwen3MoeForCausalLM = _family("MobeQwen3Moe", "mobe_qwen3_moe", Qwen3MoeConfig,
                                                      Qwen3MoeForCausalLM)
MobeDeepseekV3Config, MobeDeepseekV3ForCausalLM = _family("MobeDeepseekV3", "mobe_deepseek_v3", DeepseekV3Config,
                                                          DeepseekV3ForCausalLM)
MobeKimiK2Config, MobeKimiK2ForCausalLM = _family("MobeKimiK2", "mobe_kimi_k2", DeepseekV3Config, DeepseekV3ForCausalLM)
