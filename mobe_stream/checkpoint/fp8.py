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
CHUNK_ELEMENTS = 1 << 24  # dequantize works ~this many elements at a time


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
    rows_per_chunk = _chunk_rows(n, bm)
    for r0 in range(0, m, rows_per_chunk):
        r1 = min(m, r0 + rows_per_chunk)
        s = _expand(s32[r0 // bm : (r1 + bm - 1) // bm], (r1 - r0, n), block)
        out[r0:r1] = (q[r0:r1].to(torch.float32) * s).to(out_dtype)
    return out


def _chunk_rows(n: int, bm: int) -> int:
    """Rows dequantized at a time: whole row blocks, about 2**24 elements (64 MiB of fp32)."""
    return bm * max(1, CHUNK_ELEMENTS // max(1, n * bm))


def dequant_temp_bytes(shape: tuple[int, ...], block: tuple[int, int] = DEFAULT_BLOCK) -> int:
    """Peak fp32 temporaries of `dequantize` for one 2-D matrix of `shape` (the upcast chunk, its
    expanded scale and their product), for memory planning."""
    m, n = shape[-2], shape[-1]
    return 3 * 4 * min(m, _chunk_rows(n, block[0])) * n


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


def _matrices(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *t.shape[-2:])


def quantize_stack(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """Block-quantize every matrix of a stack [..., M, N] (blocks never straddle two matrices):
    (float8_e4m3fn [..., M, N], fp32 scale_inv [..., ceil(M/bm), ceil(N/bn)])."""
    if w.dim() == 2:
        return quantize(w, block)
    sm, sn = scale_shape((w.shape[-2], w.shape[-1]), block)
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    scale = torch.empty((*w.shape[:-2], sm, sn), dtype=torch.float32, device=w.device)
    qf, sf = _matrices(q), _matrices(scale)
    for i, m in enumerate(_matrices(w)):
        qf[i], sf[i] = quantize(m, block)
    return q, scale


def dequantize_stack(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                     out_dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Inverse of quantize_stack (a 2-D weight is the stack of one)."""
    if q.dim() == 2:
        return dequantize(q, scale_inv, block, out_dtype)
    if tuple(scale_inv.shape[:-2]) != tuple(q.shape[:-2]):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match stacked weight {tuple(q.shape)}")
    out = torch.empty(q.shape, dtype=out_dtype, device=q.device)
    of, sf = _matrices(out), _matrices(scale_inv)
    for i, m in enumerate(_matrices(q)):
        of[i] = dequantize(m, sf[i], block, out_dtype)
    return out


def dequantize_batch(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK,
                     out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A batch of matrices [k, M, N] in one vectorized pass on q's device (the solver dequantizes
    an expert batch of device-resident FP8 targets inside every step; a per-matrix Python loop
    would dominate the step). Same values as `dequantize_stack`. The codes are widened to bf16 first
    (exact: e4m3's 3-bit mantissa and exponent range fit in bf16), then one multiply computes each
    product in fp32 and writes it rounded once to `out_dtype`: no fp32 temporary of the batch's size
    unless fp32 is the output."""
    k, m, n = q.shape
    bm, bn = block
    sm, sn = scale_shape((m, n), block)
    if tuple(scale_inv.shape) != (k, sm, sn):
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weights {tuple(q.shape)} (want {(k, sm, sn)})")
    s = scale_inv.to(device=q.device, dtype=torch.float32)
    codes = q.to(torch.bfloat16)
    out = torch.empty((k, m, n), dtype=out_dtype, device=q.device)
    if m % bm == 0 and n % bn == 0:  # the usual case: a broadcast over whole blocks, no expanded copy
        torch.mul(codes.view(k, sm, bm, sn, bn), s[:, :, None, :, None], out=out.view(k, sm, bm, sn, bn))
    elif m % bm == 0:  # whole row blocks, a partial last column block: the scale widened along columns only
        cols = s.repeat_interleave(bn, dim=2)[:, :, :n]
        torch.mul(codes.view(k, sm, bm, n), cols[:, :, None, :], out=out.view(k, sm, bm, n))
    else:
        full = s.repeat_interleave(bm, dim=1)[:, :m].repeat_interleave(bn, dim=2)[:, :, :n]
        torch.mul(codes, full, out=out)
    return out


def roundtrip(w: torch.Tensor, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """What `w` reads back as after FP8 storage, in fp32."""
    q, s = quantize_stack(w, block)
    return dequantize_stack(q, s, block, torch.float32)
