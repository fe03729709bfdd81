"""Grouped-query attention as the GQA families write it; what differs is a few RuntimeConfig fields:
q/k RMSNorm per head before RoPE (Qwen3-MoE, GLM-4.5 with use_qk_norm) or over the whole q/k
projection (OLMoE, MiniMax-M2), q/k/v clamping (OLMoE clip_qkv), RoPE on the leading rot_dim dims
of a head only (GLM-4.5, MiniMax-M2), biases where the checkpoint has them (Qwen2-MoE, GLM-4.5, gpt-oss),
attention sinks where it has them (gpt-oss `self_attn.sinks`: one more logit per head in the softmax,
whose probability is dropped), Llama-4's NoPE layers (no RoPE, q scaled by the attention temperature
instead) and weightless L2 q/k norm after RoPE."""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .cache import KVCache
from .config import RuntimeConfig
from .ops import l2_norm, rms_norm
from .rope import Rope


def _rotate(rope: Rope, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rot: int) -> torch.Tensor:
    if rot == x.shape[-1]:
        return rope.apply(x, cos, sin)
    return torch.cat([rope.apply(x[..., :rot], cos, sin), x[..., rot:]], dim=-1)


def _temperature(q: torch.Tensor, start: int, attn_scale: float, floor_scale: float) -> torch.Tensor:
    """Llama-4 NoPE layers: q at position t times log1p(floor((t + 1) / floor_scale)) * attn_scale + 1."""
    pos = torch.arange(start, start + q.shape[-2], device=q.device, dtype=torch.float32)
    scale = torch.log1p(torch.floor((pos + 1.0) / floor_scale)) * attn_scale + 1.0
    return (q * scale[:, None]).to(q.dtype)


def _attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, sinks: torch.Tensor,
                       scale: float) -> torch.Tensor:
    """softmax over [scores, sink] per head (in fp32), the sink's share dropped, times v."""
    scores = (q @ k.mT).float() * scale
    scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().reshape(1, -1, 1, 1).expand(*scores.shape[:-1], 1)
    probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)[..., :-1]
    return probs.to(v.dtype) @ v


def gqa_attention(w: Mapping[str, torch.Tensor], x: torch.Tensor, cfg: RuntimeConfig, rope: Rope,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
                  layer: int) -> torch.Tensor:
    B, S, _ = x.shape
    hd, H, KV = cfg.head_dim, cfg.num_heads, cfg.num_kv_heads
    q = F.linear(x, w["self_attn.q_proj.weight"], w.get("self_attn.q_proj.bias"))
    k = F.linear(x, w["self_attn.k_proj.weight"], w.get("self_attn.k_proj.bias"))
    v = F.linear(x, w["self_attn.v_proj.weight"], w.get("self_attn.v_proj.bias"))
    if cfg.qk_norm == "full":
        q = rms_norm(q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    if cfg.clip_qkv is not None:
        q, k, v = (t.clamp(-cfg.clip_qkv, cfg.clip_qkv) for t in (q, k, v))
    q, k, v = q.view(B, S, H, hd), k.view(B, S, KV, hd), v.view(B, S, KV, hd)
    if cfg.qk_norm == "head":
        q = rms_norm(q, w["self_attn.q_norm.weight"], cfg.rms_norm_eps)
        k = rms_norm(k, w["self_attn.k_norm.weight"], cfg.rms_norm_eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    if layer not in cfg.nope_layers:
        q, k = _rotate(rope, q, cos, sin, cfg.rot_dim), _rotate(rope, k, cos, sin, cfg.rot_dim)
        if cfg.qk_norm == "l2":
            q, k = l2_norm(q, cfg.rms_norm_eps), l2_norm(k, cfg.rms_norm_eps)
    elif cfg.attn_temperature is not None:
        q = _temperature(q, mask.shape[-1] - S, *cfg.attn_temperature)
    if cache is not None:
        k, v = cache.update(layer, k, v, seq_dim=2)
    if KV != H:  # repeat each kv head for its group of query heads
        k = k.repeat_interleave(H // KV, dim=1)
        v = v.repeat_interleave(H // KV, dim=1)
    sinks = w.get("self_attn.sinks")
    if sinks is None:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=hd ** -0.5)
    else:
        out = _attend_with_sinks(q, k, v, mask, sinks, hd ** -0.5)
    return F.linear(out.transpose(1, 2).reshape(B, S, H * hd), w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
