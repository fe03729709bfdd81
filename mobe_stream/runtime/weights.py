"""Which stored tensors make up each execution unit, and in which dtype the runtime wants them.

Units, in module order: `embed`, `layers.0` ... `layers.{L-1}`, `norm`, `lm_head` (accelerate's
order; a decoder layer is never split). Names inside a unit are relative to its prefix and spelled
canonically whatever the family calls them (FamilySpec.runtime_name), e.g. `self_attn.q_proj.weight`
or `mlp.experts.3.down_proj.weight` (Mixtral's `block_sparse_moe.experts.3.w2.weight`). FP8 scales are not separate
weights: they travel with their FP8 weight, which stays 1 byte per parameter until the compute reads
it (see unit_weights.py). Planned sizes come from the shard headers alone.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection

import torch

from ..checkpoint import fp8, mobe_format
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError
from .config import RuntimeConfig
from .unit_weights import UnitWeights

ST_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "F64": torch.float64,
             "F8_E4M3": torch.float8_e4m3fn, "I64": torch.int64, "I32": torch.int32}
# kept in their stored float dtype: the runtime upcasts them to fp32 itself
KEEP_STORED = ("mlp.gate.e_score_correction_bias", mobe_format.ALPHA)


def unit_names(cfg: RuntimeConfig) -> list[str]:
    return ["embed"] + [f"layers.{i}" for i in range(cfg.num_layers)] + ["norm", "lm_head"]


def unit_tensors(reader: CheckpointReader, cfg: RuntimeConfig, unit: str) -> dict[str, str]:
    """relative name -> stored name for one unit (scale companions and rotary buffers left out)."""
    top = cfg.prefix  # "language_model." for a multimodal checkpoint's text model
    if unit == "embed":
        return {"weight": f"{top}model.embed_tokens.weight"}
    if unit == "norm":
        return {"weight": f"{top}model.norm.weight"}
    if unit == "lm_head":
        head = f"{top}lm_head.weight"
        return {"weight": head if head in reader or not cfg.tie_word_embeddings else f"{top}model.embed_tokens.weight"}
    prefix = f"{top}model.{unit}."
    out = {}
    for n in reader.names():
        if n.startswith(prefix) and not n.endswith(fp8.SCALE_SUFFIX) and "rotary_emb." not in n:
            out[cfg.spec.runtime_name(n[len(prefix):])] = n  # the family's names, spelled canonically
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


def unit_scales(reader: CheckpointReader, tensors: dict[str, str]) -> dict[str, str]:
    """relative name -> block-scale name for the unit's FP8 tensors; scale shapes checked from headers,
    so a bad checkpoint fails at planning, not in the middle of a forward."""
    out = {}
    for rel, name in tensors.items():
        scale = reader.scale_of(name)
        if scale is None:
            continue
        shape, got = reader.info(name).shape, reader.info(scale).shape
        want = fp8.scale_shape((shape[-2], shape[-1]), reader.scale_block) if len(shape) >= 2 else None
        if want is None or tuple(got) != tuple(shape[:-2]) + want:
            raise CheckpointError(f"{scale} has shape {list(got)}, which does not fit {name} {list(shape)} with "
                                  f"{list(reader.scale_block)} blocks", reader.shard_path(reader.info(scale).shard))
        out[rel] = scale
    return out



def tensor_stored_bytes(reader: CheckpointReader, cfg: RuntimeConfig, rel: str, name: str, scale: str | None,
                        dtype: torch.dtype) -> int:
    """Bytes one tensor holds between uses: an FP8 weight as stored (1 byte/param) plus its fp32
    scale; any other tensor in its compute dtype (cast once when loaded or fetched)."""
    info = reader.info(name)
    if scale is not None:
        return info.nbytes + reader.info(scale).nbytes
    return math.prod(info.shape) * target_dtype(cfg, rel, stored_dtype(reader, name), dtype).itemsize


def unit_stored_bytes(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> int:
    """Bytes the unit holds between uses (tensor_stored_bytes summed)."""
    tensors = unit_tensors(reader, cfg, unit)
    scales = unit_scales(reader, tensors)
    return sum(tensor_stored_bytes(reader, cfg, rel, name, scales.get(rel), dtype) for rel, name in tensors.items())


EXPERT_BATCH_BYTES = 256 << 20  # compute-dtype weights of one batch of routed experts (Kimi-K2 bf16: 3 experts)


def experts_per_batch(expert_bytes: int) -> int:
    """Routed experts run together (moe.run_experts) so that their compute-dtype weights (stacked,
    FP8 ones dequantized in one pass) stay within EXPERT_BATCH_BYTES."""
    return max(1, EXPERT_BATCH_BYTES // max(expert_bytes, 1))


def _dequant_group(rel: str) -> str:
    """Weights dequantized together: an MLP's (one expert's) gate/up/down are alive at once inside
    swiglu; an attention matrix is used and dropped on its own."""
    parts = rel.split(".")
    if parts[0] == "mlp":
        for i, part in enumerate(parts):
            if part.endswith("_proj"):
                return ".".join(parts[:i])
    return rel


def unit_working_bytes(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> int:
    """Room for the dequantized temporaries of the unit's FP8 weights while it runs:

        max over groups (an MLP / a batch of routed experts: gate+up+down; an attention matrix alone)
        of the group's compute-dtype bytes (routed experts: one expert's bytes x experts_per_batch)
        + fp8.dequant_temp_bytes of the unit's largest FP8 matrix (fp32 chunk temporaries).

    0 for units without FP8 weights."""
    tensors = unit_tensors(reader, cfg, unit)
    groups: dict[str, int] = {}
    temps = 0
    for rel in unit_scales(reader, tensors):
        shape = reader.info(tensors[rel]).shape
        key = _dequant_group(rel)
        groups[key] = groups.get(key, 0) + math.prod(shape[-2:]) * dtype.itemsize
        temps = max(temps, fp8.dequant_temp_bytes(shape, reader.scale_block))
    for key, b in groups.items():
        if key.startswith("mlp.experts"):  # one expert (per-expert names, or a slice of the stacked tensors)
            groups[key] = b * min(cfg.num_experts, experts_per_batch(b))
    return max(groups.values(), default=0) + temps


def unit_nbytes(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> int:
    """Planned bytes of a unit: what it holds as stored plus its dequantization working room (from
    headers only, no weight read). Kimi-K2 MoE layer: ~17 GB, not the 34 GB of a bf16 copy."""
    return unit_stored_bytes(reader, cfg, unit, dtype) + unit_working_bytes(reader, cfg, unit, dtype)


def build_unit(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype,
               read: Callable[[str], torch.Tensor], copy: bool, only: Collection[str] | None = None) -> UnitWeights:
    """A unit's weights (those named in `only`, if given) through build_weights."""
    tensors = unit_tensors(reader, cfg, unit)
    if only is not None:
        tensors = {rel: n for rel, n in tensors.items() if rel in only}
    return build_weights(reader, cfg, tensors, unit_scales(reader, tensors), dtype, read, copy)


def build_weights(reader: CheckpointReader, cfg: RuntimeConfig, tensors: dict[str, str], scales: dict[str, str],
                  dtype: torch.dtype, read: Callable[[str], torch.Tensor], copy: bool) -> UnitWeights:
    """Weights from `read(stored name)` (the tensor as stored): FP8 ones with their scales kept as
    stored, the rest cast to their compute dtype. copy: make private copies of what `read` returned
    (for resident units: no view of a shard mapping survives)."""
    held: dict[str, torch.Tensor] = {}
    held_scales: dict[str, torch.Tensor] = {}
    for rel, name in tensors.items():
        t = read(name)
        if rel in scales:
            s = read(scales[rel])
            held[rel], held_scales[rel] = (t.clone(), s.clone()) if copy else (t, s)
        else:
            held[rel] = t.to(target_dtype(cfg, rel, t.dtype, dtype), copy=copy)
    return UnitWeights(held, held_scales, dtype, reader.scale_block)


def load_unit(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> UnitWeights:
    """Read one unit into fresh CPU tensors (FP8 kept as stored, dequantized at use)."""
    return build_unit(reader, cfg, unit, dtype, reader.get, copy=True)
