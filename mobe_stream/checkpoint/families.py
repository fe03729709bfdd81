"""Model-family adapters, driven by a table of FamilySpec rows rather than if-chains on names.

A family answers: which layers are MoE, what are the config numbers (under any of the spellings
released configs and transformers 5.x use), and where each routed expert's weights are stored.

Two storage layouts exist for routed experts (detected from the tensor names, per checkpoint):
  per_expert  `model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight` [out, in] (hub format)
  fused       `model.layers.N.mlp.experts.gate_up_proj` [E, 2p, d] (gate rows first, then up)
              and `model.layers.N.mlp.experts.down_proj` [E, d, p] (transformers 5.x in memory)
FP8 weights carry `<tensor>_scale_inv` companions (3-D `[E, sm, sn]` when fused).

In the fused layout gate_proj and up_proj live in ONE tensor, so `expert_tensor_names(layer,
"gate_proj")` and `(layer, "up_proj")` both return `gate_up_proj` (+ its scale). Callers that
drop or rewrite both projections treat the union as replaced; callers that only replace one must
keep the fused tensor (there is no way to store half of it).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ..errors import CheckpointError
from . import fp8
from .mobe_format import source_config

if TYPE_CHECKING:
    from .reader import CheckpointReader

PROJS = ("gate_proj", "up_proj", "down_proj")
PER_EXPERT, FUSED = "per_expert", "fused"
EXPERTS_MODULE = "mlp.experts."  # routed experts, relative to a decoder layer's prefix
_PER_EXPERT_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.\d+\.(gate|up|down)_proj\.weight$")
_FUSED_RE = re.compile(r"^model\.layers\.\d+\.mlp\.experts\.(gate_up|down)_proj$")
_LAYER_RE = re.compile(r"^model\.layers\.(\d+)\.")


def layer_of(name: str) -> int | None:
    """Decoder layer a tensor belongs to (None for embeddings, final norm, lm_head)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _first(config: dict, keys: tuple[str, ...], default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


def _deepseek_is_moe(config: dict, i: int) -> bool:
    """DeepSeek reference rule: MoE from first_k_dense_replace on, every moe_layer_freq-th layer."""
    freq = int(config.get("moe_layer_freq") or 1)
    first = config.get("first_k_dense_replace")
    first = 3 if first is None else int(first)  # transformers' DeepseekV3Config default
    return num_experts(config) > 0 and i >= first and i % freq == 0


def _qwen3_is_moe(config: dict, i: int) -> bool:
    """transformers Qwen3MoeDecoderLayer rule."""
    step = int(config.get("decoder_sparse_step") or 1)
    return (i not in (config.get("mlp_only_layers") or [])) and num_experts(config) > 0 and (i + 1) % step == 0


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]  # used only when config has no model_type
    is_moe_layer: Callable[[dict, int], bool]
    router_tensors: tuple[str, ...]  # under "model.layers.N.mlp."
    shared_expert_module: str | None  # under "model.layers.N.mlp.", None if the family has none


_DEEPSEEK_ROUTER = ("gate.weight", "gate.e_score_correction_bias")

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("deepseek_v3", ("deepseek_v3",), ("DeepseekV3ForCausalLM",), _deepseek_is_moe,
               _DEEPSEEK_ROUTER, "shared_experts"),
    FamilySpec("kimi_k2", ("kimi_k2",), (), _deepseek_is_moe, _DEEPSEEK_ROUTER, "shared_experts"),
    FamilySpec("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), _qwen3_is_moe, ("gate.weight",), None),
)
SUPPORTED = tuple(sorted(f.name for f in FAMILIES))


# ---- config helpers (any spelling) -----------------------------------------------------------

def num_experts(config: dict) -> int:
    return int(_first(config, ("n_routed_experts", "num_experts", "num_local_experts"), 0) or 0)


def hidden_size(config: dict) -> int:
    return int(config["hidden_size"])


def moe_intermediate_size(config: dict) -> int:
    return int(config["moe_intermediate_size"])


def num_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


def top_k(config: dict) -> int:
    return int(_first(config, ("num_experts_per_tok", "moe_topk", "top_k"), 0) or 0)


def config_dtype(config: dict) -> str | None:
    """Storage dtype name from `dtype` (transformers 5.x) or `torch_dtype` (older configs)."""
    return _first(config, ("dtype", "torch_dtype"))


def rope_config(config: dict) -> dict | None:
    """RoPE settings from `rope_parameters` (transformers 5.x) or `rope_scaling` (older configs)."""
    return _first(config, ("rope_parameters", "rope_scaling"))


def find_spec(config: dict) -> FamilySpec | None:
    config = source_config(config)  # a compact output names its own model_type; its family is the source's
    mt = config.get("model_type")
    if mt:
        return next((f for f in FAMILIES if mt in f.model_types), None)
    archs = config.get("architectures") or []
    return next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)


# ---- bound family ----------------------------------------------------------------------------

class Family:
    """A FamilySpec bound to one checkpoint's config (and its tensor names, for the layout)."""

    def __init__(self, spec: FamilySpec, config: dict, reader: CheckpointReader | None = None,
                 config_path: Path | None = None):
        self.spec = spec
        self.config = config
        self.reader = reader
        self.config_path = config_path
        for key in ("num_hidden_layers", "hidden_size", "moe_intermediate_size"):
            if not isinstance(config.get(key), int) or config[key] < 0:
                raise CheckpointError(f"{spec.name} config has no valid {key} (got {config.get(key)!r})", config_path)
        self.num_layers = num_layers(config)
        self.hidden_size = hidden_size(config)
        self.moe_intermediate_size = moe_intermediate_size(config)
        self.num_experts = num_experts(config)
        self.top_k = top_k(config)
        self.layout = detect_layout(reader.names(), reader.model_dir) if reader is not None else PER_EXPERT

    @property
    def name(self) -> str:
        return self.spec.name

    def __repr__(self) -> str:
        return f"Family({self.name}, layout={self.layout}, E={self.num_experts}, layers={self.num_layers})"

    # -- layers
    def is_moe_layer(self, layer: int) -> bool:
        return 0 <= layer < self.num_layers and self.spec.is_moe_layer(self.config, layer)

    def moe_layers(self) -> list[int]:
        """MoE decoder layers; extra stored layers (DeepSeek MTP, index >= num_layers) are not included."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def layer_prefix(self, layer: int) -> str:
        return f"model.layers.{layer}."  # _LAYER_RE reads it back

    def experts_prefix(self, layer: int) -> str:
        return self.layer_prefix(layer) + EXPERTS_MODULE

    def layer_tensor_names(self, reader: CheckpointReader, layer: int) -> list[str]:
        pre = self.layer_prefix(layer)
        return [n for n in reader.names() if n.startswith(pre)]

    def router_weight_name(self, layer: int) -> str:
        """The router's [E, d] weight (the first router tensor of the family)."""
        return f"{self.layer_prefix(layer)}mlp.{self.spec.router_tensors[0]}"

    def router_names(self, layer: int) -> list[str]:
        """Router tensors of an MoE layer (those present, when bound to a reader)."""
        names = [f"{self.layer_prefix(layer)}mlp.{t}" for t in self.spec.router_tensors]
        return [n for n in names if self.reader is None or n in self.reader]

    def shared_expert_prefix(self, layer: int) -> str | None:
        m = self.spec.shared_expert_module
        return None if m is None else f"{self.layer_prefix(layer)}mlp.{m}."

    # -- expert storage
    def _weight_names(self, layer: int, proj: str) -> list[str]:
        _check_proj(proj)
        pre = self.experts_prefix(layer)
        if self.layout == FUSED:
            return [fused_name(pre, proj)]
        return [per_expert_name(pre, e, proj) for e in range(self.num_experts)]

    def expert_tensor_names(self, layer: int, proj: str) -> list[str]:
        """Stored tensors holding `proj` of all experts of `layer`, with FP8 scale companions.

        Fused layout: gate_proj and up_proj both name `gate_up_proj` (see the module docstring).
        """
        out = []
        for n in self._weight_names(layer, proj):
            out.append(n)
            s = fp8.scale_name(n)
            if self.reader is not None and s in self.reader:
                out.append(s)
        return out

    def expert_weight(self, reader: CheckpointReader, layer: int, expert: int, proj: str,
                      dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One expert's `proj` as [out, in] (gate/up [p, d], down [d, p]), FP8 dequantized to dtype."""
        _check_proj(proj)
        if not 0 <= expert < self.num_experts:
            raise CheckpointError(f"layer {layer} has no expert {expert} (num_experts {self.num_experts})",
                                  reader.model_dir)
        pre = self.experts_prefix(layer)
        if self.layout == PER_EXPERT:
            return reader.get(per_expert_name(pre, expert, proj), dtype)
        if proj == "down_proj":
            return reader.get_expert(fused_name(pre, proj), expert, dtype)
        name = fused_name(pre, proj)
        p = self.moe_intermediate_size
        shape = reader.info(name).shape
        if len(shape) != 3 or shape[1] != 2 * p:
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected [E, 2*{p}, d]",
                                  reader.model_dir / reader.info(name).shard)
        both = reader.get_expert(name, expert, dtype)
        half = both[:p] if proj == "gate_proj" else both[p:]
        return half.clone()  # don't keep the other half alive through a view

    def expert_stack(self, reader: CheckpointReader, layer: int, proj: str,
                     dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """[E, out, in] for one projection, reading one expert at a time (peak = result + 1 expert)."""
        first = self.expert_weight(reader, layer, 0, proj, dtype)
        out = torch.empty((self.num_experts, *first.shape), dtype=first.dtype)
        out[0] = first
        del first
        for e in range(1, self.num_experts):
            out[e] = self.expert_weight(reader, layer, e, proj, dtype)
        return out


    def expert_stack_stored(self, reader: CheckpointReader, layer: int, proj: str
                            ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """[E, out, in] in the source's own precision, plus the [E, sm, sn] fp32 block scales when it
        is FP8 (else None): the solver keeps targets this way (a quarter of fp32's bytes for FP8).
        bf16/fp16/fp32 come back as stored; other encodings (and fused FP8, which no released model
        uses) are dequantized to fp32."""
        pre = self.experts_prefix(layer)
        name = per_expert_name(pre, 0, proj) if self.layout == PER_EXPERT else fused_name(pre, proj)
        info = reader.info(name)
        scaled = reader.scale_of(name) is not None
        kept = kept_target_dtype(info.dtype, scaled, self.layout == PER_EXPERT)
        if kept is None:
            return self.expert_stack(reader, layer, proj, torch.float32), None
        data = self.expert_stack(reader, layer, proj, None)
        if not scaled:
            return data, None
        first = reader.get(fp8.scale_name(per_expert_name(pre, 0, proj)))
        scales = torch.empty((self.num_experts, *first.shape), dtype=torch.float32)
        scales[0] = first
        for e in range(1, self.num_experts):
            scales[e] = reader.get(fp8.scale_name(per_expert_name(pre, e, proj)))
        return data, scales


def kept_target_dtype(stored: str, scaled: bool, per_expert: bool = True) -> torch.dtype | None:
    """The dtype a solver keeps expert targets stored as `stored` (safetensors name) in: bf16, fp16
    and fp32 as they are, block-scaled FP8 with its scales (per-expert layout), anything else None
    (dequantized to fp32). The one rule for expert_stack_stored and the cost estimate."""
    if stored == "F8_E4M3":
        return fp8.FP8_DTYPE if scaled and per_expert else None
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(stored)


def per_expert_name(experts_prefix: str, expert: int, proj: str) -> str:
    """Hub per-expert layout: `<prefix>E.<proj>.weight`, [out, in]."""
    return f"{experts_prefix}{expert}.{proj}.weight"


def fused_name(experts_prefix: str, proj: str) -> str:
    """Fused layout: gate_proj and up_proj share `<prefix>gate_up_proj` [E, 2p, d]; `<prefix>down_proj` [E, d, p]."""
    return experts_prefix + ("down_proj" if proj == "down_proj" else "gate_up_proj")


def _check_proj(proj: str) -> None:
    if proj not in PROJS:
        raise ValueError(f"unknown projection {proj!r}; expected one of {', '.join(PROJS)}")


def detect_layout(names: list[str], where: Path | None = None) -> str:
    """per_expert or fused, from tensor names; a checkpoint mixing both is refused."""
    per = any(_PER_EXPERT_RE.match(n) for n in names)
    fused = any(_FUSED_RE.match(n) for n in names)
    if per and fused:
        raise CheckpointError("checkpoint mixes per-expert and fused expert tensors", where)
    return FUSED if fused else PER_EXPERT


def get_family(config: dict, reader: CheckpointReader | None = None) -> Family:
    """The Family for this config, bound to the reader's tensor names (for the storage layout)."""
    config_path = reader.config_path if reader is not None else None
    spec = find_spec(config)
    if spec is None:
        mt = config.get("model_type")
        label = mt or next(iter(config.get("architectures") or []), None) or "unknown"
        raise CheckpointError(f"unsupported model family {label!r} (model_type {mt!r}, architectures "
                              f"{config.get('architectures')!r}); supported: {', '.join(SUPPORTED)}", config_path)
    return Family(spec, config, reader, config_path)
