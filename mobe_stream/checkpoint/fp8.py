"""DeepSeek-style block-scaled FP8 (float8_e4m3fn weight + fp32 `weight_scale_inv` per block).

`weight_scale_inv` is a multiplier despite its name: w[i, j] = fp32(q[i, j]) * s[i // bm, j // bn].
Dequantization is done in fp32 and rounded once to the output dtype (casting the scale to bf16
first would round twice).
"""

from __future__ import annotations

import math

import torch

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK = (128, 128)
SCALE_SUFFIX = "_scale_inv"  # appended to "<module>.weight"


def scale_name(weight_name: str) -> str:
    """`a.b.weight` -> `a.b.weight_scale_inv`."""
    return weight_name + SCALE_SUFFIX


def scale_shape(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[int, ...]:
    """Blocks over the last two dims; leading dims (experts [E, p, r], bases [G, m, r, d]) are one
    matrix each, so every matrix has its own scales."""
    if len(shape) < 2:
        raise ValueError(f"FP8 block scales need a matrix (>= 2 dims), got shape {tuple(shape)}")
    return (*shape[:-2], math.ceil(shape[-2] / block[0]), math.ceil(shape[-1] / block[1]))


def stored_bytes(shape: tuple[int, ...], dtype: torch.dtype, block: tuple[int, int] = DEFAULT_BLOCK) -> int:
    """Bytes a tensor of `shape` takes when stored as `dtype`; FP8 (e4m3) counts 1 byte an element
    plus its fp32 `weight_scale_inv` (see scale_shape). The one byte formula for planners and writers."""
    n = math.prod(shape)
    if dtype == FP8_DTYPE:
        return n + math.prod(scale_shape(shape, block)) * 4
    return n * dtype.itemsize


def _expand(scale: torch.Tensor, shape: tuple[int, int], block: tuple[int, int]) -> torch.Tensor:
    """Blow a per-block scale up to per-element (edge blocks use the same block index)."""
    bm, bn = block
    return scale.repeat_interleave(bm, dim=0)[: shape[0]].repeat_interleave(bn, dim=1)[:, : shape[1]]


def dequantize(
    q: torch.Tensor,
    scale_inv: torch.Tensor,
    block: tuple[int, int] = DEFAULT_BLOCK,
    out_dtype: torch.dtype = torch.bfloat16,
) -> torch.Tensor:
    """Block-dequantize a 2-D FP8 weight. Works row-block by row-block to bound temporary memory."""
    if q.dim() != 2:
        raise ValueError(f"FP8 block dequantization expects a 2-D weight, got shape {tuple(q.shape)}")
    m, n = q.shape
    want = scale_shape((m, n), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {m}x{n} (want {want})")
    bm = block[0]
    out = torch.empty((m, n), dtype=out_dtype, device=q.device)
    s32 = scale_inv.to(torch.float32)
    rows_per_chunk = bm * max(1, (1 << 24) // max(1, n * bm))  # ~64 MiB of fp32 temporaries
    for r0 in range(0, m, rows_per_chunk):
        r1 = min(m, r0 + rows_per_chunk)
        s = _expand(s32[r0 // bm : (r1 + bm - 1) // bm], (r1 - r0, n), block)
        out[r0:r1] = (q[r0:r1].to(torch.float32) * s).to(out_dtype)
    return out


def quantize(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize a 2-D weight to (float8_e4m3fn weight, fp32 scale_inv), amax per block -> 448."""
    if w.dim() != 2:
        raise ValueError(f"FP8 block quantization expects a 2-D weight, got shape {tuple(w.shape)}")
    m, n = w.shape
    bm, bn = block
    sm, sn = scale_shape((m, n), block)
    w32 = w.to(torch.float32)
    padded = torch.zeros((sm * bm, sn * bn), dtype=torch.float32, device=w.device)
    padded[:m, :n] = w32
    amax = padded.abs().reshape(sm, bm, sn, bn).amax(dim=(1, 3))
    scale = (amax / FP8_MAX).clamp_min(torch.finfo(torch.float32).tiny)
    q = (w32 / _expand(scale, (m, n), block)).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q, scale
