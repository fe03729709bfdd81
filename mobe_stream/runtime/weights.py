"""Which stored tensors make up each execution unit, and in which dtype the runtime wants them.

Units, in module order: `embed`, `layers.0` ... `layers.{L-1}`, `norm`, `lm_head` (accelerate's
order; a decoder layer is never split). Names inside a unit are relative to its prefix, e.g.
`self_attn.q_proj.weight` or `mlp.experts.3.down_proj.weight`. FP8 scales are not separate
weights: reading `X.weight` with a dtype dequantizes with `X.weight_scale_inv`.
"""

from __future__ import annotations

import torch

from ..checkpoint import fp8, mobe_format
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError
from .config import RuntimeConfig

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32}
# kept in their stored float dtype: the runtime upcasts them to fp32 itself
KEEP_STORED = ("mlp.gate.e_score_correction_bias", mobe_format.ALPHA)


def unit_names(cfg: RuntimeConfig) -> list[str]:
    return ["embed"] + [f"layers.{i}" for i in range(cfg.num_layers)] + ["norm", "lm_head"]


def unit_tensors(reader: CheckpointReader, cfg: RuntimeConfig, unit: str) -> dict[str, str]:
    """relative name -> stored name for one unit (scale companions and rotary buffers left out)."""
    if unit == "embed":
        return {"weight": "model.embed_tokens.weight"}
    if unit == "norm":
        return {"weight": "model.norm.weight"}
    if unit == "lm_head":
        name = "lm_head.weight" if "lm_head.weight" in reader or not cfg.tie_word_embeddings else "model.embed_tokens.weight"
        return {"weight": name}
    prefix = f"model.{unit}."
    out = {}
    for n in reader.names():
        if n.startswith(prefix) and not n.endswith(fp8.SCALE_SUFFIX) and "rotary_emb." not in n:
            out[n[len(prefix):]] = n
    if not out:
        raise CheckpointError(f"no tensors for decoder layer {unit} (expected names under {prefix})", reader.model_dir)
    return out


def target_dtype(cfg: RuntimeConfig, rel: str, stored: torch.dtype, dtype: torch.dtype) -> torch.dtype:
    """Compute dtype for most weights; routers/biases/mixing logits stay in their (float) stored dtype."""
    keep = rel.endswith(KEEP_STORED) or (cfg.is_deepseek and rel == "mlp.gate.weight")
    if keep and stored.is_floating_point and stored.itemsize >= 2:
        return stored
    return dtype


def stored_dtype(reader: CheckpointReader, name: str) -> torch.dtype:
    s = reader.info(name).dtype
    if s not in ST_DTYPES:
        raise CheckpointError(f"tensor {name} has unsupported dtype {s}", reader.model_dir)
    return ST_DTYPES[s]


def unit_nbytes(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> int:
    """Bytes the unit takes once loaded for compute (FP8 counted at the compute dtype)."""
    total = 0
    for rel, name in unit_tensors(reader, cfg, unit).items():
        n = 1
        for s in reader.info(name).shape:
            n *= s
        total += n * target_dtype(cfg, rel, stored_dtype(reader, name), dtype).itemsize
    return total


def needs_conversion(reader: CheckpointReader, cfg: RuntimeConfig, rel: str, name: str, dtype: torch.dtype) -> bool:
    st = stored_dtype(reader, name)
    return st != target_dtype(cfg, rel, st, dtype) or fp8.scale_name(name) in reader


def load_unit(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Read (and dequantize/cast) one unit into fresh CPU tensors."""
    out = {}
    for rel, name in unit_tensors(reader, cfg, unit).items():
        out[rel] = reader.get(name, target_dtype(cfg, rel, stored_dtype(reader, name), dtype))
    return out
