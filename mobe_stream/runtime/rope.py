"""Rotary position embeddings: default, linear, llama3 (Llama-4) and YaRN (DeepSeek-V3 / Kimi-K2) frequencies.

YaRN also changes attention in two places: cos/sin are multiplied by an attention factor, and
DeepSeek multiplies the softmax scale by mscale(factor, mscale_all_dim)^2.
"""

from __future__ import annotations

import math

import torch


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _factor(rope: dict, max_pos: int) -> float:
    f = rope.get("factor")
    return float(f) if f is not None else max_pos / rope["original_max_position_embeddings"]


def inv_freq_and_scale(rope: dict, dim: int, max_pos: int) -> tuple[torch.Tensor, float]:
    """(inv_freq [dim/2] fp32, factor applied to cos/sin)."""
    base = float(rope["rope_theta"])
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    kind = rope["rope_type"]
    if kind == "default":
        return 1.0 / pos_freqs, 1.0
    if kind == "linear":
        return 1.0 / (pos_freqs * float(rope["factor"])), 1.0
    if kind == "llama3":
        return _llama3(1.0 / pos_freqs, rope), 1.0
    factor = _factor(rope, max_pos)
    attn = rope.get("attention_factor")
    if attn is None:
        ms, ms_all = rope.get("mscale"), rope.get("mscale_all_dim")
        attn = yarn_mscale(factor, ms) / yarn_mscale(factor, ms_all) if ms and ms_all else yarn_mscale(factor)
    beta_fast, beta_slow = rope.get("beta_fast") or 32, rope.get("beta_slow") or 1
    orig = rope["original_max_position_embeddings"]

    def corr_dim(rot: float) -> float:  # dimension index whose wavelength makes `rot` turns over `orig`
        return dim * math.log(orig / (rot * 2 * math.pi)) / (2 * math.log(base))

    low, high = corr_dim(beta_fast), corr_dim(beta_slow)
    if rope.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrap = 1 - ramp  # 1: keep the original frequency, 0: interpolate (divide by factor)
    inv = (1.0 / (factor * pos_freqs)) * (1 - extrap) + (1.0 / pos_freqs) * extrap
    return inv, float(attn)


def _llama3(inv: torch.Tensor, rope: dict) -> torch.Tensor:
    """Llama 3/4: wavelengths longer than orig/low_freq_factor divided by factor, shorter than
    orig/high_freq_factor kept, a smooth blend in between."""
    factor, low, high = float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"])
    orig = float(rope["original_max_position_embeddings"])
    wavelen = 2 * math.pi / inv
    smooth = ((orig / wavelen - low) / (high - low)).clamp(0, 1)
    blended = (1 - smooth) * inv / factor + smooth * inv
    return torch.where(wavelen > orig / low, inv / factor, torch.where(wavelen < orig / high, inv, blended))


def softmax_scale(rope: dict, head_dim: int, max_pos: int) -> float:
    """DeepSeek's attention scale: head_dim^-0.5, times mscale_all_dim^2 under YaRN."""
    scale = head_dim ** -0.5
    if rope["rope_type"] != "default" and rope.get("mscale_all_dim"):
        m = yarn_mscale(_factor(rope, max_pos), rope["mscale_all_dim"])
        scale *= m * m
    return scale


class Rope:
    """cos/sin for arbitrary positions (computed on the fly: cheap, and no max-length table)."""

    def __init__(self, rope: dict, dim: int, max_pos: int, interleave: bool = False):
        self.inv_freq, self.scale = inv_freq_and_scale(rope, dim, max_pos)
        self.interleave = interleave

    def cos_sin(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)[None, :]  # [S, dim/2]
        return (freqs.cos() * self.scale).to(dtype), (freqs.sin() * self.scale).to(dtype)

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [..., S, dim]. Interleaved pairs (x0,x1),(x2,x3) come out de-interleaved (evens, then odds):
        q and k get the same permutation, so their dot products are unchanged."""
        if self.interleave:
            x1, x2 = x[..., 0::2], x[..., 1::2]
        else:
            half = x.shape[-1] // 2
            x1, x2 = x[..., :half], x[..., half:]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
