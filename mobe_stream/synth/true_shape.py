"""Header-true checkpoints of released giant MoE models, with every data region left as a hole.

Config, tensor names, shapes, dtypes (FP8 with block scales where the hub has them), shard count
and shard names are those of the released model; each shard is its safetensors header followed by
a hole (`truncate` to the full size), so Kimi-K2 (~1.03 TB, ~139.6k tensors) costs a few MB of disk
and seconds to write. The data reads as zeros. It exists to test planning at true scale: opening
and validating 140k headers, inspect's parameter and byte projections, and preflight refusals.
Names and configs come from the tiny factory (`layout.py`, `configs.py`); only the numbers differ.
"""

from __future__ import annotations

import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ..checkpoint.safetensors_io import ITEMSIZE, atomic_write_json, encode_header
from .configs import deepseek_v3_config, qwen3_moe_config
from .layout import Spec, deepseek_specs, qwen3_moe_specs, stored
from .make import group_specs, shard_name


@dataclass(frozen=True)
class TrueShape:
    """One released checkpoint: the factory's config arguments, the keys it sets differently, and its sharding."""

    family: str
    size: dict  # num_layers, num_experts, hidden, moe_inter, vocab for the configs.py function
    overrides: dict = field(default_factory=dict)  # config keys whose released value differs from the tiny one
    num_shards: int = 1
    unpadded: bool = False  # Kimi-K2 names shards model-1-of-62.safetensors
    mtp: bool = False  # DeepSeek-V3 stores its MTP layer as model.layers.61.*


_YARN = {"type": "yarn", "mscale": 1.0, "mscale_all_dim": 1.0, "beta_slow": 1.0, "original_max_position_embeddings": 4096}

TRUE_SHAPES: dict[str, TrueShape] = {
    "kimi_k2": TrueShape(  # moonshotai/Kimi-K2-Instruct
        "kimi_k2", {"num_layers": 61, "num_experts": 384, "hidden": 7168, "moe_inter": 2048, "vocab": 163840},
        {"intermediate_size": 18432, "num_attention_heads": 64, "num_key_value_heads": 64, "q_lora_rank": 1536,
         "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
         "num_experts_per_tok": 8, "num_nextn_predict_layers": 0, "max_position_embeddings": 131072,
         "bos_token_id": 163584, "eos_token_id": 163585, "transformers_version": "4.48.3",
         "rope_scaling": {**_YARN, "factor": 32.0, "beta_fast": 1.0}},
        num_shards=62, unpadded=True),
    "deepseek_v3": TrueShape(  # deepseek-ai/DeepSeek-V3
        "deepseek_v3", {"num_layers": 61, "num_experts": 256, "hidden": 7168, "moe_inter": 2048, "vocab": 129280},
        {"intermediate_size": 18432, "num_attention_heads": 128, "num_key_value_heads": 128, "q_lora_rank": 1536,
         "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
         "num_experts_per_tok": 8, "n_group": 8, "topk_group": 4, "first_k_dense_replace": 3,
         "max_position_embeddings": 163840, "bos_token_id": 0, "eos_token_id": 1,
         "rope_scaling": {**_YARN, "factor": 40.0, "beta_fast": 32.0}},
        num_shards=163, mtp=True),
    "qwen3_moe": TrueShape(  # Qwen/Qwen3-235B-A22B
        "qwen3_moe", {"num_layers": 94, "num_experts": 128, "hidden": 4096, "moe_inter": 1536, "vocab": 151936},
        {"intermediate_size": 12288, "num_attention_heads": 64, "num_key_value_heads": 4, "head_dim": 128,
         "num_experts_per_tok": 8, "mlp_only_layers": [], "max_position_embeddings": 40960,
         "bos_token_id": 151643, "eos_token_id": 151645},
        num_shards=118),
}


def true_config(family: str) -> dict:
    """The released config.json of `family`'s true-shape model."""
    t = _true_shape(family)
    if family == "qwen3_moe":
        cfg = qwen3_moe_config(**t.size, dtype="bfloat16")
    else:
        cfg = deepseek_v3_config(**t.size, dtype="bfloat16", kimi=family == "kimi_k2", fp8=True)
    return {**cfg, **t.overrides}


def true_entries(family: str) -> list[list[tuple[str, str, tuple[int, ...]]]]:
    """Per shard, in order: (name, safetensors dtype, shape) of every stored tensor."""
    t = _true_shape(family)
    cfg = true_config(family)
    if family == "qwen3_moe":
        specs = qwen3_moe_specs(cfg, fused=False)
    else:
        specs = deepseek_specs(cfg, fused=False, kimi=family == "kimi_k2", mtp=t.mtp)
    block = tuple(cfg["quantization_config"]["weight_block_size"]) if "quantization_config" in cfg else None

    def entries(s: Spec) -> list[tuple[str, str, tuple[int, ...]]]:
        return stored(s, "BF16", block)

    def nbytes(s: Spec) -> int:
        return sum(math.prod(shape) * ITEMSIZE[dt] for _, dt, shape in entries(s))

    groups = group_specs(specs, nbytes, t.num_shards)
    if len(groups) != t.num_shards:  # the released shard count is part of what this fixture promises
        raise AssertionError(f"{family}: {len(groups)} shards, want {t.num_shards}")
    return [[e for s in g for e in entries(s)] for g in groups]


def make_true_shape(out_dir: str | os.PathLike, family: str = "kimi_k2", *, sparse: bool = True) -> Path:
    """Write `family`'s released checkpoint layout to `out_dir` with hole-only data. Returns its path.

    Only sparse output exists (the data would be ~1 TB). A filesystem without holes is detected
    on the first shard, which is removed, and a ValueError raised: nothing fills the disk.
    """
    t = _true_shape(family)
    if not sparse:
        raise ValueError("true-shape checkpoints are sparse only (the data would be ~1 TB); pass sparse=True")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    shards = true_entries(family)
    weight_map: dict[str, str] = {}
    total = 0
    for i, entries in enumerate(shards, 1):
        fname = shard_name(i, len(shards), t.unpadded)
        header = encode_header(entries, {"format": "pt"})
        data = sum(math.prod(shape) * ITEMSIZE[dt] for _, dt, shape in entries)
        path = out / fname
        with open(path, "wb") as f:
            f.write(header)
            f.truncate(len(header) + data)  # a hole: no block is allocated for the data
        if i == 1 and not is_sparse(path):
            path.unlink()
            raise ValueError(f"{out}: this filesystem does not keep holes in files; a true-shape checkpoint "
                             f"would take its full size on disk")
        weight_map.update((name, fname) for name, _, _ in entries)
        total += data
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    cfg = true_config(family)
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "generation_config.json",
                      {"bos_token_id": cfg["bos_token_id"], "eos_token_id": cfg["eos_token_id"], "do_sample": False})
    return out


def is_sparse(path: str | os.PathLike) -> bool:
    """Whether most of `path` is holes (allocated blocks under half its apparent size)."""
    st = os.stat(path)
    return st.st_blocks * 512 < st.st_size // 2


def _true_shape(family: str) -> TrueShape:
    try:
        return TRUE_SHAPES[family]
    except KeyError:
        raise ValueError(f"no true shape for {family!r}; choose one of {', '.join(TRUE_SHAPES)}") from None

