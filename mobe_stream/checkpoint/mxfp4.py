"""MXFP4 as gpt-oss publishes its experts: `<name>_blocks` + `<name>_scales`, read as the dense `<name>`.

`<name>_blocks` uint8 `[*lead, rows, G, 16]`: 32 FP4 (e2m1) values per block, two per byte, the low
nibble first; `<name>_scales` uint8 `[*lead, rows, G]`: one e8m0 exponent per block (2^(s - 127)).
The blocks run along the input dimension of each `[rows = out, G * 32 = in]` matrix, so the dense
tensor, in the hub's `[*lead, in, out]` orientation (`gate_up_proj` `[E, d, 2p]`, `down_proj`
`[E, p, d]`), is the dequantized matrix with its last two dims swapped. Every FP4 value times a power
of two is exact in bfloat16 (8 exponent bits, 7 mantissa bits), so the dense form is bfloat16 and
loses nothing; the reader presents only `<name>` (checkpoint/reader.py), so every consumer sees
dense tensors.
"""

from __future__ import annotations

import math

import torch

BLOCKS_SUFFIX, SCALES_SUFFIX = "_blocks", "_scales"
BLOCK = 32  # values per scale
BYTES = BLOCK // 2
DENSE_DTYPE, DENSE_ST = torch.bfloat16, "BF16"  # exact for every MXFP4 value (module docstring)
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)  # e2m1 codes


def pair_of(name: str) -> str | None:
    """`X_blocks` -> `X` (the dense name it stands for), any other name -> None."""
    return name[: -len(BLOCKS_SUFFIX)] if name.endswith(BLOCKS_SUFFIX) else None


def dense_shape(blocks_shape: tuple[int, ...]) -> tuple[int, ...]:
    """`[*lead, rows, G, 16]` -> `[*lead, G * 32, rows]`."""
    *lead, rows, groups, _ = blocks_shape
    return (*lead, groups * BLOCK, rows)


def check_pair(blocks_shape: tuple[int, ...], scales_shape: tuple[int, ...]) -> str | None:
    """Why a blocks/scales pair is malformed, or None."""
    if len(blocks_shape) < 3 or blocks_shape[-1] != BYTES:
        return f"blocks of shape {list(blocks_shape)} are not [..., rows, groups, {BYTES}]"
    if tuple(scales_shape) != tuple(blocks_shape[:-1]):
        return f"scales of shape {list(scales_shape)} do not match blocks {list(blocks_shape)}"
    return None


def dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = DENSE_DTYPE) -> torch.Tensor:
    """The dense `[*lead, in, out]` tensor of a blocks/scales pair (module docstring), contiguous."""
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32)
    *lead, rows, groups, _ = blocks.shape
    b = blocks.to(torch.int64)
    vals = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).reshape(*lead, rows, groups, BLOCK)
    vals = torch.ldexp(vals, scales.to(torch.int32)[..., None] - 127)
    return vals.reshape(*lead, rows, groups * BLOCK).mT.to(dtype).contiguous()


def quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A dense `[*lead, in, out]` tensor (in a multiple of 32) -> (blocks, scales), round to nearest
    FP4 value with the block's scale 2^ceil(log2(amax / 6)) (for tiny test checkpoints)."""
    t = w.float().mT
    *lead, rows, cols = t.shape
    if cols % BLOCK:
        raise ValueError(f"MXFP4 needs the input dimension to be a multiple of {BLOCK}, got {cols}")
    t = t.reshape(*lead, rows, cols // BLOCK, BLOCK)
    amax = t.abs().amax(dim=-1).clamp_min(2.0 ** -120)
    exp = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = t / torch.exp2(exp)[..., None]
    lut = torch.tensor(FP4_VALUES)
    codes = (scaled[..., None] - lut).abs().argmin(dim=-1)  # nearest code (+0.0 before -0.0)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (exp + 127).to(torch.uint8)


def dense_nbytes(shape: tuple[int, ...]) -> int:
    return math.prod(shape) * DENSE_DTYPE.itemsize


def dense_config(config: dict) -> dict:
    """A config without an MXFP4 `quantization_config`: what is written from a reader's tensors is dense."""
    q = config.get("quantization_config")
    if isinstance(q, dict) and q.get("quant_method") == "mxfp4":
        return {k: v for k, v in config.items() if k != "quantization_config"}
    return config
