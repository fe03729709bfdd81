"""DeepSeek-V3 / Kimi-K2 multi-head latent attention (MLA).

The cache holds only the compressed latent (after kv_a_layernorm) and the rotated shared rope key;
keys and values are re-expanded through kv_b_proj each step (the straightforward form, as in
transformers; the "absorbed" form would be faster for long contexts).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from .cache import KVCache
from .config import RuntimeConfig
from .ops import rms_norm
from .rope import Rope


def mla_attention(w: Mapping[str, torch.Tensor], x: torch.Tensor, cfg: RuntimeConfig, rope: Rope,
                  cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor, cache: KVCache | None,
                  layer: int, scale: float) -> torch.Tensor:
    B, S, _ = x.shape
    H, nope, rd, vd = cfg.num_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    eps = cfg.rms_norm_eps
    if "self_attn.q_proj.weight" in w:  # q_lora_rank None
        q = F.linear(x, w["self_attn.q_proj.weight"])
    else:
        qa = F.linear(x, w["self_attn.q_a_proj.weight"], w.get("self_attn.q_a_proj.bias"))
        q = F.linear(rms_norm(qa, w["self_attn.q_a_layernorm.weight"], eps), w["self_attn.q_b_proj.weight"])
    q = q.view(B, S, H, nope + rd).transpose(1, 2)
    q_nope, q_rot = q.split([nope, rd], dim=-1)

    ckv = F.linear(x, w["self_attn.kv_a_proj_with_mqa.weight"], w.get("self_attn.kv_a_proj_with_mqa.bias"))
    latent, k_rot = ckv.split([cfg.kv_lora_rank, rd], dim=-1)
    latent = rms_norm(latent, w["self_attn.kv_a_layernorm.weight"], eps)
    q_rot, k_rot = rope.apply(q_rot, cos, sin), rope.apply(k_rot, cos, sin)
    if cache is not None:
        latent, k_rot = cache.update(layer, latent, k_rot, seq_dim=1)
    T = latent.shape[1]

    kv = F.linear(latent, w["self_attn.kv_b_proj.weight"]).view(B, T, H, nope + vd).transpose(1, 2)
    k_nope, v = kv.split([nope, vd], dim=-1)
    k = torch.cat([k_nope, k_rot[:, None].expand(B, H, T, rd)], dim=-1)
    q = torch.cat([q_nope, q_rot], dim=-1)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return F.linear(out.transpose(1, 2).reshape(B, S, H * vd), w["self_attn.o_proj.weight"], w.get("self_attn.o_proj.bias"))
