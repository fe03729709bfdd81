"""Write tiny (or wide) hub-layout checkpoints, shard by shard, never holding the model in RAM."""

from __future__ import annotations

import hashlib
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import fp8, mxfp4
from ..checkpoint.families import IN_MEMORY, MULTIMODAL, SUPPORTED, FusedForm, get_family
from ..checkpoint.safetensors_io import atomic_write_json, write_safetensors
from ..dtypes import dtype_key
from .configs import MXFP4_QUANT, deepseek_v3_config, family_config, llama4_multimodal_config, qwen3_moe_config
from .kimi_tokenizer import DEFAULT_VOCAB as TIKTOKEN_VOCAB
from .kimi_tokenizer import write_kimi_tokenizer
from .layout import Spec, deepseek_specs, family_specs, llama4_vision_specs, qwen3_moe_specs
from .tokenizer import write_tokenizer

FAMILIES = SUPPORTED  # the factory makes every family the table supports
TOKENIZERS = ("tokenizers", "tiktoken")


class _Values:
    """Deterministic tensor values. Structured experts: W_e = C_cluster + U_e V_e + noise, so that
    the experts of a layer share structure as in trained models (a shared basis then fits well)."""

    def __init__(self, seed: int, structured: bool, clusters: int = 4):
        self.seed, self.structured, self.clusters = seed, structured, clusters
        self._common: dict = {}

    def _gen(self, *key: object) -> torch.Generator:
        digest = hashlib.sha256(repr((self.seed,) + key).encode()).digest()  # stable across processes
        return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & 0x7FFFFFFFFFFFFFFF)

    def linear(self, spec: Spec) -> torch.Tensor:
        return torch.randn(spec.shape, generator=self._gen(spec.name)) * 0.02

    def expert(self, spec: Spec, E: int, form: FusedForm = IN_MEMORY) -> torch.Tensor:
        """One expert's [out, in] matrix, or (fused) all experts in the family's fused form."""
        assert spec.layer is not None and spec.proj is not None, "expert specs name their layer and projection"
        if spec.expert is None:  # fused [E, ...]
            layer = spec.layer
            if spec.proj == "gate_up_proj":
                p, d = (spec.shape[2] // 2, spec.shape[1]) if form.in_first else (spec.shape[1] // 2, spec.shape[2])
                gate, up = (torch.stack([self._one(layer, pr, e, (p, d), E) for e in range(E)])
                            for pr in ("gate_proj", "up_proj"))
                return form.join(gate, up)
            d, p = (spec.shape[2], spec.shape[1]) if form.in_first else spec.shape[1:]
            down = torch.stack([self._one(layer, spec.proj, e, (d, p), E) for e in range(E)])
            return down.mT.contiguous() if form.in_first else down
        return self._one(spec.layer, spec.proj, spec.expert, spec.shape, E)

    def _one(self, layer: int, proj: str, e: int, shape: tuple, E: int) -> torch.Tensor:
        g = self._gen(layer, proj, e)
        if not self.structured:
            return torch.randn(shape, generator=g) * 0.02
        c = e * self.clusters // E
        key = (layer, proj, c)
        if key not in self._common:
            if any(k[0] != layer for k in self._common):  # keep one layer's centres (fused gate/up alternate)
                self._common = {}
            self._common[key] = torch.randn(shape, generator=self._gen(*key)) * 0.015
        k = max(1, min(shape) // 8)
        low = (torch.randn(shape[0], k, generator=g) @ torch.randn(k, shape[1], generator=g)) * (0.012 / k**0.5)
        return self._common[key] + low + torch.randn(shape, generator=g) * 0.003


def _tensors(spec: Spec, values: _Values, dtype: torch.dtype, quantize: bool, E: int, block,
             form: FusedForm = IN_MEMORY, packed: bool = False) -> list[tuple[str, torch.Tensor]]:
    if spec.kind == "norm":
        return [(spec.name, torch.ones(spec.shape, dtype=dtype))]
    if spec.kind == "bias":
        return [(spec.name, (torch.randn(spec.shape, generator=values._gen(spec.name)) * 0.01).float())]
    if spec.kind == "inv_freq":
        n = spec.shape[0]
        return [(spec.name, 1.0 / (50000.0 ** (torch.arange(0, 2 * n, 2, dtype=torch.float32) / (2 * n))))]
    w = values.expert(spec, E, form) if spec.kind == "expert" else values.linear(spec)
    if packed and spec.kind == "expert":  # gpt-oss's MXFP4 experts
        blocks, scales = mxfp4.quantize(w)
        return [(spec.name + mxfp4.BLOCKS_SUFFIX, blocks), (spec.name + mxfp4.SCALES_SUFFIX, scales)]
    if quantize and spec.kind in ("linear", "expert"):
        if w.dim() == 3:
            qs = [fp8.quantize(x, block) for x in w]
            return [(spec.name, torch.stack([q for q, _ in qs])), (fp8.scale_name(spec.name), torch.stack([s for _, s in qs]))]
        q, s = fp8.quantize(w, block)
        return [(spec.name, q), (fp8.scale_name(spec.name), s)]
    return [(spec.name, w.to(dtype))]


def _nbytes(spec: Spec, dtype: torch.dtype, quantize: bool) -> int:
    n = 1
    for s in spec.shape:
        n *= s
    return n * (1 if quantize and spec.kind in ("linear", "expert") else dtype.itemsize)


def make_tiny_moe(out_dir: str | Path, family: str = "qwen3_moe", *, fp8: bool = False, mxfp4: bool = False,
                  layout: str = "per_expert",
                  structured: bool = True, num_layers: int | None = None, num_experts: int | None = None,
                  hidden_size: int | None = None, moe_intermediate_size: int | None = None, num_shards: int = 3,
                  seed: int = 0, dtype: torch.dtype = torch.bfloat16, vocab_size: int | None = None,
                  mtp_layer: bool = False, tokenizer: str = "tokenizers", multimodal: bool = False) -> Path:
    """A tiny checkpoint of `family` with the hub's config keys and tensor names. Returns its path.

    Defaults: 3 layers (the first dense), 8 experts, hidden 64, moe_intermediate 32, vocab 512; with
    fp8=True (DeepSeek-V3/Kimi-K2 only) hidden 256 and moe_intermediate 192 so that 128x128 blocks
    include partial edge blocks. mxfp4=True (gpt-oss only): routed experts as the release stores them,
    `_blocks`/`_scales` pairs (checkpoint/mxfp4.py) with its quantization_config. tokenizer="tiktoken"
    writes Kimi-K2's vocabulary layout instead of a tokenizer.json (tiktoken.model, special tokens,
    chat template; vocab 1024 by default, ids of [BOS]/[EOS]/<|im_end|> in the configs).
    multimodal=True (llama4 only): the layout Meta releases, Llama4ForConditionalGeneration with the
    text model under `language_model.` and `text_config`, beside a tiny vision tower and projector.
    """
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of {', '.join(FAMILIES)}")
    if fp8 and family not in ("deepseek_v3", "kimi_k2"):
        raise ValueError("FP8 block-scaled checkpoints are a DeepSeek-V3/Kimi-K2 format")
    if mxfp4 and family != "gpt_oss":
        raise ValueError("MXFP4 experts are a gpt-oss format")
    if multimodal and family != "llama4":
        raise ValueError("the multimodal layout is Llama-4's")
    if layout not in ("per_expert", "fused"):
        raise ValueError("layout must be per_expert or fused")
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"tokenizer must be one of {', '.join(TOKENIZERS)}")
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    kw: dict[str, Any] = dict(num_layers=num_layers or 3, num_experts=num_experts or 8,
              hidden=hidden_size or (256 if fp8 else 64), moe_inter=moe_intermediate_size or (192 if fp8 else 32),
              vocab=vocab_size or (TIKTOKEN_VOCAB if tokenizer == "tiktoken" else 512), dtype=dtype_key(dtype))
    fused = layout == "fused"
    if family == "qwen3_moe":
        cfg = qwen3_moe_config(**kw)
        specs = qwen3_moe_specs(cfg, fused)
        E = cfg["num_experts"]
    elif family not in ("deepseek_v3", "kimi_k2"):
        cfg = family_config(family, **kw)
        specs = family_specs(cfg, fused)
        E = get_family(cfg).num_experts
        if mxfp4:
            cfg["quantization_config"] = dict(MXFP4_QUANT)
        if multimodal:
            cfg = llama4_multimodal_config(cfg)
            specs = [replace(s, name=MULTIMODAL["llama4"][1] + s.name) for s in specs] + llama4_vision_specs(cfg)
    else:
        cfg = deepseek_v3_config(**kw, kimi=family == "kimi_k2", fp8=fp8)
        specs = deepseek_specs(cfg, fused, family == "kimi_k2", mtp_layer)
        E = cfg["n_routed_experts"]
    gen = {"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}
    if tokenizer == "tiktoken":  # before any weight: a vocab_size too small for it fails at once
        ids = write_kimi_tokenizer(out, cfg["vocab_size"])
        cfg["bos_token_id"], cfg["eos_token_id"] = ids["[BOS]"], ids["[EOS]"]
        gen.update(bos_token_id=ids["[BOS]"], eos_token_id=ids["<|im_end|>"])  # Kimi ends a turn with <|im_end|>
    else:
        write_tokenizer(out, get_family(cfg).config["vocab_size"])
    _write_shards(out, specs, _Values(seed, structured), dtype, fp8, E, num_shards, unpadded=family == "kimi_k2",
                  form=get_family(cfg).form, packed=mxfp4)
    atomic_write_json(out / "config.json", cfg)
    atomic_write_json(out / "generation_config.json", gen)
    return out


def shard_name(i: int, n: int, unpadded: bool) -> str:
    """`model-00001-of-00003.safetensors`, or Kimi-K2's unpadded `model-1-of-3.safetensors`."""
    return f"model-{i}-of-{n}.safetensors" if unpadded else f"model-{i:05d}-of-{n:05d}.safetensors"


def group_specs(specs: list[Spec], size, num_shards: int) -> list[list[Spec]]:
    """Consecutive specs in up to `num_shards` groups of about equal `size(spec)` bytes (a spec never splits)."""
    cap = -(-sum(size(s) for s in specs) // num_shards)
    groups: list[list[Spec]] = [[]]
    filled = 0
    for s in specs:
        if filled >= cap and len(groups) < num_shards:
            groups.append([])
            filled = 0
        groups[-1].append(s)
        filled += size(s)
    return groups


def _write_shards(out: Path, specs: list[Spec], values: _Values, dtype, quantize: bool, E: int, num_shards: int,
                  unpadded: bool, form: FusedForm = IN_MEMORY, packed: bool = False) -> None:
    groups = group_specs(specs, lambda s: _nbytes(s, dtype, quantize), num_shards)
    n = len(groups)
    weight_map = {}
    for i, group in enumerate(groups, 1):
        fname = shard_name(i, n, unpadded)
        items = [t for s in group for t in _tensors(s, values, dtype, quantize, E, tuple(fp8.DEFAULT_BLOCK), form, packed)]
        write_safetensors(out / fname, items, {"format": "pt"})
        weight_map.update({name: fname for name, _ in items})
        del items
    size_all = sum((out / f).stat().st_size for f in set(weight_map.values()))
    atomic_write_json(out / "model.safetensors.index.json", {"metadata": {"total_size": size_all}, "weight_map": weight_map})


def make_wide_kimi(out_dir: str | Path, num_layers: int = 61, num_experts: int = 384, hidden_size: int = 64,
                   moe_intermediate_size: int = 32, fp8: bool = False, seed: int = 0, num_shards: int | None = None) -> Path:
    """Kimi-K2-shaped (61 layers, 384 experts, first layer dense) with tiny dims, for memory benchmarks."""
    return make_tiny_moe(out_dir, "kimi_k2", fp8=fp8, num_layers=num_layers, num_experts=num_experts,
                         hidden_size=hidden_size, moe_intermediate_size=moe_intermediate_size, seed=seed,
                         num_shards=num_shards or max(3, num_layers // 2))
