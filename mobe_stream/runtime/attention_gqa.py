"""Qwen3-MoE attention: grouped-query heads with RMSNorm on each q/k head before RoPE."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .cache import KVCache
from .config import RuntimeConfig
from .ops import rms_norm
from .rope import Rope


def gqa_attention(w: Mapping[str, torch.Tensor], x: torch.Tensor, cfg: RuntimeConfig, rope: Rope,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
                  layer: int) -> torch.Tensor:
    B, S, _ = x.shape
    hd, H, KV = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q = F.linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias")).view(B, S, H, hd)
    k = F.linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias")).view(B, S, KV, hd)
    v = F.linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias")).view(B, S, KV, hd)
    q = rms_norm(q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps).transpose(1, 2)
    k = rms_norm(k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps).transpose(1, 2)
    v = v.transpose(1, 2)
    q, k = rope.apply(q, cos, sin), rope.apply(k, cos, sin)
    if cache is not None:
        k, v = cache.update(layer, k, v, seq_dim=2)
    if KV != H:  # repeat each kv head for its group of query heads
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
    return F.linear(out.transpose(1, 2).reshape(B, S, H * hd), w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
