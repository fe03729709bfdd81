"""The decoder: embed -> layers (attention + dense MLP or MoE) -> norm -> lm_head, over a WeightStore.

One class runs both families; the differences are the attention (GQA vs MLA), the router
(softmax vs grouped sigmoid) and shared experts, all chosen from the config. Weights come from a
WeightStore unit by unit, so the same code runs all-in-memory and offloaded plans.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.families import EXPERTS_MODULE, FUSED, detect_layout
from ..checkpoint.mobe_format import factor_name
from ..checkpoint.reader import CheckpointReader
from ..dtypes import AUTO, COMPUTE, dtype_name, to_torch
from ..errors import ConfigError, ResourceError, warning
from ..sizes import parse_size
from .attention_gqa import gqa_attention
from .attention_mla import mla_attention
from .cache import KVCache, causal_mask
from .config import RuntimeConfig, parse_config
from .device_map import Device, Warn, check_gpus, parse_max_memory, plan_device_map, resolve_device_map
from .expert_plan import CACHE_KEY, plan_experts
from .expert_plan import STRATEGY as EXPERTS_STRATEGY
from .expert_store import ExpertWeightStore
from .mobe_experts import LowRankExperts, MixedBasisCache, MobeExperts, all_bases_bytes, auto_cache_bytes
from .moe import GLU, ROUTE, ExpertMath, OriginalExperts, run_experts
from .offload import WeightStore
from .offload_folder import check_folder
from .ops import rms_norm, swiglu
from .rope import Rope, softmax_scale
from .unit_weights import UnitWeights
from .weights import unit_names, unit_nbytes


class MoEModel:
    unit_sizes: dict[str, int]  # bytes per placement unit, set by load_model

    def __init__(self, reader: CheckpointReader, store: WeightStore | ExpertWeightStore, cfg: RuntimeConfig, dtype: torch.dtype,
                 mobe_cache: MixedBasisCache | None = None, materialize_all: bool = False):
        self.reader, self.store, self.cfg, self.dtype = reader, store, cfg, dtype
        self.mobe_cache, self.materialize_all = mobe_cache, materialize_all
        self.mobe_act = (cfg.mobe or {}).get("activation", "silu")
        self.mobe_mixed = 0
        self.rope = Rope(cfg.rope, cfg.rot_dim, cfg.max_position_embeddings, cfg.rope_interleave)
        if cfg.attention == "mla":
            self.scale = softmax_scale(cfg.rope, cfg.head_dim, cfg.max_position_embeddings)
        else:
            self.scale = cfg.head_dim ** -0.5
        self.moe_layers = set(cfg.moe_layers)
        # called with (MoE inputs [n, d], routed experts [n, top_k]) by every MoE layer (calibrate.py)
        self.moe_probe: Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], object] | None = None
        self.layout = detect_layout(reader.names(), reader.model_dir, cfg.spec)

    @property
    def plan(self) -> dict[str, Device]:
        return self.store.plan

    def mobe_cache_stats(self) -> dict | None:
        """Mixed-basis cache counters (hits, misses, hit_rate, bytes); None without a cache."""
        return self.mobe_cache.stats() if self.mobe_cache is not None else None

    def expert_stats(self) -> dict | None:
        """Routed-expert cache counters under `--device-map experts` (None for other plans)."""
        return self.store.expert_stats() if isinstance(self.store, ExpertWeightStore) else None

    def new_cache(self) -> KVCache:
        return KVCache(self.cfg.num_layers)

    @torch.inference_mode()
    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, V] (fp32). With a cache, continues after its cached tokens."""
        if tokens.dim() == 1:
            tokens = tokens[None]
        start = cache.length if cache is not None else 0
        S = tokens.shape[1]
        w = self.store.get("embed")
        h = F.embedding(tokens.to(w["weight"].device), w["weight"])
        per_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        for i in range(self.cfg.num_layers):
            unit = f"layers.{i}"
            w = self.store.get(unit)
            dev = self.store.device_of(unit)
            if dev not in per_device:
                pos = torch.arange(start, start + S, device=dev)
                cos, sin = self.rope.cos_sin(pos, self.dtype)
                per_device[dev] = (cos, sin, causal_mask(S, start + S, dev, self.cfg.sliding_window))
            h = self._layer(i, w, h.to(dev), *per_device[dev], cache)
            del w
        w = self.store.get("norm")
        h = rms_norm(h.to(w["weight"].device), w["weight"], self.cfg.rms_norm_eps)
        w = self.store.get("lm_head")
        logits = F.linear(h.to(w["weight"].device), w["weight"]).float()
        if cache is not None:
            cache.length += S
        return logits

    __call__ = forward

    def _layer(self, i: int, w: UnitWeights, h: torch.Tensor, cos, sin, mask, cache: KVCache | None) -> torch.Tensor:
        cfg = self.cfg
        x = rms_norm(h, w["input_layernorm.weight"], cfg.rms_norm_eps)
        if i in cfg.layer_windows or i in cfg.layer_chunks:  # this layer's own window/chunk on top of the model's mask
            mask = mask & causal_mask(mask.shape[-2], mask.shape[-1], mask.device, cfg.layer_windows.get(i),
                                      cfg.layer_chunks.get(i))
        if cfg.attention == "mla":
            a = mla_attention(w, x, cfg, self.rope, cos, sin, mask, cache, i, self.scale)
        else:
            a = gqa_attention(w, x, cfg, self.rope, cos, sin, mask, cache, i)
        h = h + a
        x = rms_norm(h, w["post_attention_layernorm.weight"], cfg.rms_norm_eps)
        if i in self.moe_layers:
            return h + self._moe(i, w, x)
        return h + swiglu(x, w["mlp.gate_proj.weight"], w["mlp.up_proj.weight"], w["mlp.down_proj.weight"])

    def _moe(self, i: int, w: UnitWeights, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        x2 = x.reshape(-1, x.shape[-1])
        weights, idx = ROUTE[cfg.router](x2, w, cfg)
        if self.moe_probe is not None:
            self.moe_probe(x2, idx, weights if cfg.weights_on_inputs else None)  # Llama-4: the inputs are scaled
        p = cfg.moe_intermediate_size
        math = ExpertMath(cfg.spec.fused_form if self.layout == FUSED else None, GLU[cfg.glu], cfg.swiglu_limit)
        bank: OriginalExperts
        if factor_name(EXPERTS_MODULE, "gate_proj", "mobe_A") in w:
            bank = MobeExperts(w, p, math, i, self.mobe_act, self.mobe_cache, self.materialize_all)
        elif factor_name(EXPERTS_MODULE, "gate_proj", "lowrank_U") in w:
            bank = LowRankExperts(w, p, math, cfg.hidden_size)
        else:
            bank = OriginalExperts(w, p, math, cfg.hidden_size)
        out = run_experts(x2, weights, idx, bank, cfg.weights_on_inputs)
        self.mobe_mixed += getattr(bank, "mixed", 0)
        if "mlp.shared_experts.gate_proj.weight" in w:
            shared = swiglu(x2, w["mlp.shared_experts.gate_proj.weight"], w["mlp.shared_experts.up_proj.weight"],
                            w["mlp.shared_experts.down_proj.weight"])
            if "mlp.shared_expert_gate.weight" in w:  # Qwen2-MoE: a sigmoid gate per token on the shared expert
                shared = torch.sigmoid(F.linear(x2, w["mlp.shared_expert_gate.weight"])) * shared
            out = out + shared
        return out.view_as(x)

    def close(self) -> None:
        self.store.close()
        self.reader.close()


def unit_sizes(reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype) -> dict[str, int]:
    """Planned bytes per unit (weights.unit_nbytes: stored bytes + dequantization room), headers only."""
    return {u: unit_nbytes(reader, cfg, u, dtype) for u in unit_names(cfg)}


def resolve_dtype(dtype: torch.dtype | str, config: dict | None = None, config_path: Path | None = None) -> torch.dtype:
    """The compute dtype for a dtypes.py spelling. `auto` (transformers' torch_dtype="auto") is the
    checkpoint's own: config.json's `dtype` (`torch_dtype` before transformers 5); an FP8-quantized
    checkpoint computes in bfloat16 (what its weights dequantize to); no dtype in the config: bfloat16."""
    if not isinstance(dtype, str):
        return dtype
    name = dtype_name(dtype)
    if name == AUTO:
        config = config or {}
        stored = config.get("dtype") or config.get("torch_dtype")
        if (config.get("quantization_config") or {}).get("quant_method") == "fp8" or stored is None:
            return torch.bfloat16
        name = COMPUTE.get(str(stored).removeprefix("torch.").lower(), "")
        if not name:
            raise ConfigError(f"dtype {stored!r} is not one the runtime computes in (--dtype auto); "
                              f"choose --dtype {', '.join(COMPUTE)}", config_path)
    return to_torch(name)


def plan_model(reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               device: str | None = None, dry_run: bool = False,
               expert_cache: int | str | None = None, warn: Warn | None = None) -> tuple[dict[str, Device], dict[str, int]]:
    """(unit -> device, unit -> planned bytes) from the shard headers alone; no weight is read.

    device_map: a strategy, one device, an explicit {module: device} map or a JSON file of one
    (device_map.resolve_device_map), None: everything on `device`. dry_run plans for the devices
    max_memory names whether or not this machine has them; otherwise a GPU that is not here is
    refused (one-line ConfigError) before anything is loaded. device_map "experts" plans
    expert-granular placement (expert_plan.py; its plan has extra entries). "auto" goes past
    accelerate once: when a GPU computes, whole layers would spill to disk and the expert-granular
    plan keeps everything off the disk, that plan is used instead. Warnings (disk as the last
    resort) go to `warn`, default one line on stderr, only for the plan returned."""
    if max_memory is not None and not dry_run:
        check_gpus(parse_max_memory(max_memory), "max_memory")
    if expert_cache is not None and device_map != EXPERTS_STRATEGY:
        raise ConfigError(f"--expert-cache: only used with --device-map {EXPERTS_STRATEGY}")
    notes: list[str] = []
    if device_map == EXPERTS_STRATEGY:
        plan, sizes = plan_experts(reader, cfg, dtype, max_memory, expert_cache, notes.append)
    else:
        sizes = unit_sizes(reader, cfg, dtype)
        placement = resolve_device_map(device_map, list(sizes), device)
        if isinstance(placement, dict):
            plan = placement
        else:
            plan = plan_device_map(sizes, max_memory, placement, notes.append)
            gpu = any(isinstance(d, int) for d in plan.values())
            if placement == "auto" and gpu and "disk" in plan.values() and cfg.moe_layers:
                # Whole layers would spill to disk; routed experts in RAM (or whole on the GPU) may not.
                try:
                    eplan, esizes = plan_experts(reader, cfg, dtype, max_memory, None, lambda _: None)
                except ResourceError:
                    eplan = None
                if eplan is not None and "disk" not in eplan.values():
                    plan, sizes, notes = eplan, esizes, []
    if not dry_run:
        check_gpus(plan.values(), "device map")
    for note in notes:
        (warn or warning)(note)
    return plan, sizes


def is_expert_plan(plan: dict[str, Device]) -> bool:
    """Plans from expert_plan.py carry the expert cache entry (auto may pick one, see plan_model)."""
    return CACHE_KEY in plan


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype | str = torch.float32,
               device_map: str | dict | None = None, max_memory: str | dict | None = None,
               offload_folder: str | Path | None = None, mobe_cache: int | str = "auto",
               materialize_all: bool = False, prefetch: bool = True, device: str | None = None,
               on_plan=None, expert_cache: int | str | None = None, warn: Warn | None = None) -> MoEModel:
    """Open a checkpoint and place its units.

    dtype: a torch dtype or a dtypes.py spelling, "auto" the checkpoint's own (resolve_dtype).
    device_map None: everything on `device` (default cuda if available, else cpu); one device
    ("cpu", "cuda[:N]", "N") the same there. A strategy ("auto", "balanced", "balanced_low_0",
    "sequential") plans with max_memory; a {module: device} dict or JSON file is used as given
    (device_map.explicit_map). on_plan(plan, sizes) is called before any weight is read (for
    --print-device-map); warn(line) gets the warnings (default: stderr). offload_folder: disk units'
    tensors converted to the compute dtype are kept there across runs (offload_folder.py).
    device_map "experts": non-expert weights on the compute device, routed experts on cpu/disk
    fetched per forward through an LRU of expert_cache bytes on the device (expert_plan.py).
    mobe_cache: bytes of mixed MoBE bases kept (LRU, all layers), "auto" (mobe_experts.auto_cache_bytes)
    or 0 for none; ignored for checkpoints that are not MoBE.
    """
    if isinstance(dtype, str):
        dtype_name(dtype)  # a bad spelling fails before the checkpoint is opened
    cache_size = None if mobe_cache == "auto" else parse_size(mobe_cache, "--mobe-cache", allow_zero=True)
    reader = CheckpointReader(model_dir)
    try:
        if offload_folder is not None:
            check_folder(offload_folder, reader.model_dir)
        dtype = resolve_dtype(dtype, reader.config, reader.config_path)
        cfg = parse_config(reader.config, reader.config_path)
        plan, sizes = plan_model(reader, cfg, dtype, device_map, max_memory, device, expert_cache=expert_cache, warn=warn)
        if on_plan is not None:
            on_plan(plan, sizes)
        store: WeightStore | ExpertWeightStore
        if is_expert_plan(plan):
            store = ExpertWeightStore(reader, cfg, dtype, plan, sizes)
        else:
            store = WeightStore(reader, cfg, dtype, plan, offload_folder, prefetch, warn)
    except BaseException:
        reader.close()
        raise
    cache = None
    if cfg.mobe is not None and cfg.mobe.get("method", "mobe") == "mobe":
        if cache_size is None:  # auto, sized on the device the first MoBE layer computes on
            dev = plan.get(CACHE_KEY, plan.get(f"layers.{cfg.mobe['layers'][0]}", "cpu"))
            cache_size = auto_cache_bytes(all_bases_bytes(cfg.mobe, cfg.num_experts, cfg.hidden_size, dtype),
                                          torch.device("cuda", dev) if isinstance(dev, int) else torch.device("cpu"))
        cache = MixedBasisCache(cache_size) if cache_size else None
    model = MoEModel(reader, store, cfg, dtype, cache, materialize_all)
    model.unit_sizes = sizes
    return model
