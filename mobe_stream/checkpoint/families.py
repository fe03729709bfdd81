"""Model-family adapters, driven by a table of FamilySpec rows rather than if-chains on names.

A family answers: which layers are MoE, what are the config numbers (under any of the spellings
released configs and transformers 5.x use), and where each routed expert's weights are stored.
Everything a family names (its MoE module, the stored names of gate/up/down, the config key of
the expert width, the router and shared-expert tensors, the fused form) is one FamilySpec field;
the math that differs (which layers are MoE) is one small function per rule.

Two storage layouts exist for routed experts (detected from the tensor names, per checkpoint);
`<moe>` is the family's MoE module (`mlp`, Mixtral's `block_sparse_moe`, Llama-4's `feed_forward`):
  per_expert  `model.layers.N.<moe>.experts.E.<proj>.weight` [out, in] (hub format; <proj> is the
              family's name: gate_proj/up_proj/down_proj, or Mixtral's w1/w3/w2)
  fused       `model.layers.N.<moe>.experts.gate_up_proj` and `...experts.down_proj`, one tensor per
              layer, in the family's FusedForm: transformers 5.x in memory [E, 2p, d] gate rows
              first and [E, d, p]; gpt-oss/Llama-4 hub tensors [E, d, 2p] (gate/up columns
              interleaved for gpt-oss, halves for Llama-4) and [E, p, d]
FP8 weights carry `<tensor>_scale_inv` companions (3-D `[E, sm, sn]` when fused).

In the fused layout gate_proj and up_proj live in ONE tensor, so `expert_tensor_names(layer,
"gate_proj")` and `(layer, "up_proj")` both return `gate_up_proj` (+ its scale). Callers that
drop or rewrite both projections treat the union as replaced; callers that only replace one must
keep the fused tensor (there is no way to store half of it).

The runtime reads one canonical spelling of a layer (`runtime_name`): `mlp.` for the MoE module,
`mlp.gate.weight` for the router, `mlp.experts.E.{gate,up,down}_proj.weight`, `mlp.shared_experts.`.
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
EXPERTS_MODULE = "mlp.experts."  # routed experts in the runtime's canonical names (runtime_name)
BIAS_SUFFIX = "_bias"  # gpt-oss: `<prefix>gate_up_proj_bias` [E, 2p] and `<prefix>down_proj_bias` [E, d]
# Multimodal checkpoints whose text model is a family here: model_type -> (the text model's config
# key, the prefix of its tensor names). Everything else they hold (vision tower, projector) is
# kept as stored: copied by compress and export, not read by the runner.
MULTIMODAL = {"llama4": ("text_config", "language_model.")}
_TEXT_PREFIXES = "|".join(re.escape(p) for _, p in MULTIMODAL.values())
_LAYER_RE = re.compile(rf"^(?:{_TEXT_PREFIXES})?model\.layers\.(\d+)\.")


def text_view(config: dict) -> tuple[dict, str]:
    """(the config a family reads, the prefix of the text model's tensor names). A multimodal
    config gives its text model's sub-config, with the top-level keys that describe the whole
    checkpoint's storage (dtype, quantization, a compact output's mobe block) where the sub-config
    has none; any other config is its own view with no prefix."""
    config = source_config(config)
    key, prefix = MULTIMODAL.get(config.get("model_type") or "", (None, ""))
    sub = config.get(key) if key else None
    if not isinstance(sub, dict):
        return config, ""
    inherited = {k: config[k] for k in ("dtype", "torch_dtype", "quantization_config", "mobe") if k in config}
    return {**inherited, **sub}, prefix


def layer_of(name: str) -> int | None:
    """Decoder layer a tensor belongs to (None for embeddings, final norm, lm_head, a vision tower)."""
    m = _LAYER_RE.match(name)
    return int(m.group(1)) if m else None


def _first(config: dict, keys: tuple[str, ...], default=None):
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    return default


# ---- which layers are MoE (one small function per published rule) -----------------------------

def _every_layer(config: dict, i: int) -> bool:
    """Mixtral, OLMoE, MiniMax-M2, gpt-oss: every decoder layer."""
    return num_experts(config) > 0


def _first_k_dense(default: int) -> Callable[[dict, int], bool]:
    """DeepSeek/GLM rule: MoE from first_k_dense_replace on (every moe_layer_freq-th layer, DeepSeek's
    reference code); `default` is transformers' config default when the key is absent."""
    def rule(config: dict, i: int) -> bool:
        freq = int(config.get("moe_layer_freq") or 1)
        first = config.get("first_k_dense_replace")
        first = default if first is None else int(first)
        return num_experts(config) > 0 and i >= first and i % freq == 0
    return rule


def _sparse_step(config: dict, i: int) -> bool:
    """Qwen2-MoE/Qwen3-MoE: every decoder_sparse_step-th layer, except mlp_only_layers."""
    step = int(config.get("decoder_sparse_step") or 1)
    return (i not in (config.get("mlp_only_layers") or [])) and num_experts(config) > 0 and (i + 1) % step == 0


def _ernie_range(config: dict, i: int) -> bool:
    """ERNIE-4.5-MoE: every moe_layer_interval-th layer from moe_layer_start_index to moe_layer_end_index."""
    start = int(_first(config, ("moe_layer_start_index",), 1))
    end = int(_first(config, ("moe_layer_end_index",), -1))
    end = num_layers(config) - 1 if end == -1 else end
    step = int(config.get("moe_layer_interval") or 1)
    return num_experts(config) > 0 and (i + 1) % step == 0 and start <= i <= end


def _llama4_layers(config: dict, i: int) -> bool:
    """Llama-4: `moe_layers` when given, else every interleave_moe_layer_step-th layer."""
    listed = config.get("moe_layers")
    if listed is None:
        step = int(config.get("interleave_moe_layer_step") or 1)
        listed = range(step - 1, num_layers(config), step)
    return num_experts(config) > 0 and i in listed


# ---- fused forms ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class FusedForm:
    """How one layer's fused expert tensors hold gate/up and down.

    in_first False: transformers 5.x in memory, gate_up [E, 2p, d] (gate rows, then up), down [E, d, p].
    in_first True: the hub tensors of gpt-oss and Llama-4, gate_up [E, d, 2p], down [E, p, d];
    interleaved: gate/up alternate along 2p (gpt-oss), else gate half first (Llama-4).
    """
    in_first: bool = False
    interleaved: bool = False

    def split(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Stored gate_up [..., a, b] -> (gate, up), each [..., p, d] (views)."""
        if self.in_first:
            t = t.mT
        if self.interleaved:
            return t[..., 0::2, :], t[..., 1::2, :]
        p = t.shape[-2] // 2
        return t[..., :p, :], t[..., p:, :]

    def join(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """(gate, up) [..., p, d] -> the stored gate_up (inverse of split), contiguous."""
        both = torch.stack([gate, up], dim=-2).flatten(-3, -2) if self.interleaved else torch.cat([gate, up], dim=-2)
        return (both.mT if self.in_first else both).contiguous()

    def split_bias(self, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """gate_up bias [..., 2p] -> (gate, up) biases [..., p]."""
        if self.interleaved:
            return b[..., 0::2], b[..., 1::2]
        p = b.shape[-1] // 2
        return b[..., :p], b[..., p:]

    def down(self, t: torch.Tensor) -> torch.Tensor:
        """Stored down [..., x, y] -> [..., d, p] (a view)."""
        return t.mT if self.in_first else t

    def gate_up_shape(self, E: int, p: int, d: int) -> tuple[int, int, int]:
        return (E, d, 2 * p) if self.in_first else (E, 2 * p, d)

    def down_shape(self, E: int, p: int, d: int) -> tuple[int, int, int]:
        return (E, p, d) if self.in_first else (E, d, p)


IN_MEMORY = FusedForm()


@dataclass(frozen=True)
class FamilySpec:
    name: str
    model_types: tuple[str, ...]
    architectures: tuple[str, ...]  # used only when config has no model_type
    is_moe_layer: Callable[[dict, int], bool]
    router_tensors: tuple[str, ...]  # under the MoE module; the first is the [E, d] router weight
    shared_expert_module: str | None  # under the MoE module, None if the family has none
    shared_expert_gate: str | None = None  # [1, d] sigmoid gate on the shared expert's output (Qwen2-MoE)
    moe_module: str = "mlp"  # a decoder layer's MoE (and dense MLP) module
    expert_projs: tuple[str, str, str] = PROJS  # stored names of gate_proj, up_proj, down_proj
    width_keys: tuple[str, ...] = ("moe_intermediate_size",)  # config keys of a routed expert's width p
    fused_form: FusedForm = IN_MEMORY
    # the runtime's canonical name of each router tensor (same order as router_tensors)
    router_roles: tuple[str, ...] = ("gate.weight", "gate.e_score_correction_bias")
    published: tuple[str, ...] = ()  # released models this row covers (README, error messages)

    def runtime_name(self, rel: str) -> str:
        """A layer-relative stored name in the runtime's canonical spelling (module docstring)."""
        head = self.moe_module + "."
        if not rel.startswith(head):
            return rel
        rest = rel[len(head):]
        for stored, role in zip(self.router_tensors, self.router_roles, strict=False):
            if rest == stored:
                return "mlp." + role
        if rest == self.shared_expert_gate:
            return "mlp.shared_expert_gate.weight"
        if self.shared_expert_module and rest.startswith(self.shared_expert_module + "."):
            return "mlp.shared_experts." + rest[len(self.shared_expert_module) + 1:]
        parts = rest.split(".")
        if len(parts) == 4 and parts[0] == "experts" and parts[1].isdigit() and parts[2] in self.expert_projs:
            parts[2] = PROJS[self.expert_projs.index(parts[2])]
        return "mlp." + ".".join(parts)


_DEEPSEEK_ROUTER = ("gate.weight", "gate.e_score_correction_bias")
_MIXTRAL_PROJS = ("w1", "w3", "w2")
GPT_OSS_FORM = FusedForm(in_first=True, interleaved=True)  # hub gate_up [E, d, 2p], gate/up columns alternating
LLAMA4_FORM = FusedForm(in_first=True)  # hub gate_up [E, d, 2p], gate half first

FAMILIES: tuple[FamilySpec, ...] = (
    FamilySpec("deepseek_v3", ("deepseek_v3",), ("DeepseekV3ForCausalLM",), _first_k_dense(3),
               _DEEPSEEK_ROUTER, "shared_experts", published=("DeepSeek-V3", "DeepSeek-R1")),
    FamilySpec("kimi_k2", ("kimi_k2",), (), _first_k_dense(3), _DEEPSEEK_ROUTER, "shared_experts",
               published=("Kimi-K2",)),
    FamilySpec("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeForCausalLM",), _sparse_step, ("gate.weight",), None,
               published=("Qwen3-30B-A3B", "Qwen3-235B-A22B")),
    FamilySpec("mixtral", ("mixtral",), ("MixtralForCausalLM",), _every_layer, ("gate.weight",), None,
               moe_module="block_sparse_moe", expert_projs=_MIXTRAL_PROJS, width_keys=("intermediate_size",),
               published=("Mixtral-8x7B", "Mixtral-8x22B")),
    FamilySpec("qwen2_moe", ("qwen2_moe",), ("Qwen2MoeForCausalLM",), _sparse_step, ("gate.weight",), "shared_expert",
               shared_expert_gate="shared_expert_gate.weight", published=("Qwen1.5-MoE-A2.7B", "Qwen2-57B-A14B")),
    FamilySpec("olmoe", ("olmoe",), ("OlmoeForCausalLM",), _every_layer, ("gate.weight",), None,
               width_keys=("intermediate_size",), published=("OLMoE-1B-7B",)),
    FamilySpec("deepseek_v2", ("deepseek_v2",), ("DeepseekV2ForCausalLM",), _first_k_dense(0), ("gate.weight",),
               "shared_experts", published=("DeepSeek-V2", "DeepSeek-V2-Lite", "DeepSeek-Coder-V2")),
    FamilySpec("glm4_moe", ("glm4_moe",), ("Glm4MoeForCausalLM",), _first_k_dense(1), _DEEPSEEK_ROUTER,
               "shared_experts", published=("GLM-4.5", "GLM-4.5-Air", "GLM-4.6")),
    FamilySpec("ernie4_5_moe", ("ernie4_5_moe",), ("Ernie4_5_MoeForCausalLM",), _ernie_range,
               ("gate.weight", "moe_statics.e_score_correction_bias"), "shared_experts",
               published=("ERNIE-4.5-21B-A3B", "ERNIE-4.5-300B-A47B")),
    FamilySpec("minimax_m2", ("minimax_m2",), ("MiniMaxM2ForCausalLM",), _every_layer,
               ("gate.weight", "e_score_correction_bias"), None, moe_module="block_sparse_moe",
               expert_projs=_MIXTRAL_PROJS, width_keys=("intermediate_size",), published=("MiniMax-M2",)),
    FamilySpec("gpt_oss", ("gpt_oss",), ("GptOssForCausalLM",), _every_layer, ("router.weight", "router.bias"), None,
               width_keys=("intermediate_size",), fused_form=GPT_OSS_FORM, router_roles=("gate.weight", "gate.bias"),
               published=("gpt-oss-20b", "gpt-oss-120b")),
    FamilySpec("llama4", ("llama4_text",), ("Llama4ForCausalLM",), _llama4_layers, ("router.weight",), "shared_expert",
               moe_module="feed_forward", width_keys=("intermediate_size",), fused_form=LLAMA4_FORM,
               published=("Llama-4-Scout-17B-16E", "Llama-4-Maverick-17B-128E")),
)
SUPPORTED = tuple(sorted(f.name for f in FAMILIES))


# ---- config helpers (any spelling) -----------------------------------------------------------

def num_experts(config: dict) -> int:
    return int(_first(config, ("n_routed_experts", "num_experts", "num_local_experts", "moe_num_experts"), 0) or 0)


def hidden_size(config: dict) -> int:
    return int(config["hidden_size"])


def num_layers(config: dict) -> int:
    return int(config["num_hidden_layers"])


def top_k(config: dict) -> int:
    return int(_first(config, ("num_experts_per_tok", "moe_topk", "top_k", "moe_k", "experts_per_token"), 0) or 0)


def config_dtype(config: dict) -> str | None:
    """Storage dtype name from `dtype` (transformers 5.x) or `torch_dtype` (older configs)."""
    return _first(config, ("dtype", "torch_dtype"))


def rope_config(config: dict) -> dict | None:
    """RoPE settings from `rope_parameters` (transformers 5.x) or `rope_scaling` (older configs)."""
    return _first(config, ("rope_parameters", "rope_scaling"))


def find_spec(config: dict) -> FamilySpec | None:
    config, _ = text_view(config)  # a compact output's family is its source's; a multimodal one's, its text model's
    mt = config.get("model_type")
    if mt:
        return next((f for f in FAMILIES if mt in f.model_types), None)
    archs = config.get("architectures") or []
    return next((f for f in FAMILIES if any(a in f.architectures for a in archs)), None)


def spec_named(name: str) -> FamilySpec:
    """The table row of a family name (as RuntimeConfig.family and a mobe block's source_family hold it)."""
    return next(f for f in FAMILIES if f.name == name)


def supported_list() -> str:
    """`family (published models)` for every row: what an unknown family's error lists."""
    return "; ".join(f"{f.name} ({', '.join(f.published)})" if f.published else f.name
                     for f in sorted(FAMILIES, key=lambda f: f.name))


# ---- bound family ----------------------------------------------------------------------------

class Family:
    """A FamilySpec bound to one checkpoint's config (and its tensor names, for the layout)."""

    def __init__(self, spec: FamilySpec, config: dict, reader: CheckpointReader | None = None,
                 config_path: Path | None = None):
        self.spec = spec
        config, self.prefix = text_view(config)  # prefix: "language_model." for a multimodal checkpoint's text model
        self.config = config
        self.reader = reader
        self.config_path = config_path
        width_key = next((k for k in spec.width_keys if k in config), spec.width_keys[0])
        for key in ("num_hidden_layers", "hidden_size", width_key):
            if not isinstance(config.get(key), int) or config[key] < 0:
                raise CheckpointError(f"{spec.name} config has no valid {key} (got {config.get(key)!r})", config_path)
        self.num_layers = num_layers(config)
        self.hidden_size = hidden_size(config)
        self.moe_intermediate_size = int(config[width_key])  # p, whatever the family's key for it
        self.num_experts = num_experts(config)
        self.top_k = top_k(config)
        self.layout = self.detect_layout(reader.names(), reader.model_dir) if reader is not None else PER_EXPERT

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def form(self) -> FusedForm:
        return self.spec.fused_form

    def __repr__(self) -> str:
        return f"Family({self.name}, layout={self.layout}, E={self.num_experts}, layers={self.num_layers})"

    # -- layers
    def is_moe_layer(self, layer: int) -> bool:
        return 0 <= layer < self.num_layers and self.spec.is_moe_layer(self.config, layer)

    def moe_layers(self) -> list[int]:
        """MoE decoder layers; extra stored layers (DeepSeek MTP, index >= num_layers) are not included."""
        return [i for i in range(self.num_layers) if self.is_moe_layer(i)]

    def layer_prefix(self, layer: int) -> str:
        return f"{self.prefix}model.layers.{layer}."  # _LAYER_RE reads it back

    def moe_prefix(self, layer: int) -> str:
        return f"{self.layer_prefix(layer)}{self.spec.moe_module}."

    def experts_prefix(self, layer: int) -> str:
        return self.moe_prefix(layer) + "experts."

    def layer_tensor_names(self, reader: CheckpointReader, layer: int) -> list[str]:
        pre = self.layer_prefix(layer)
        return [n for n in reader.names() if n.startswith(pre)]

    def router_weight_name(self, layer: int) -> str:
        """The router's [E, d] weight (the first router tensor of the family)."""
        return self.moe_prefix(layer) + self.spec.router_tensors[0]

    def router_names(self, layer: int) -> list[str]:
        """Router tensors of an MoE layer (those present, when bound to a reader)."""
        names = [self.moe_prefix(layer) + t for t in self.spec.router_tensors]
        return [n for n in names if self.reader is None or n in self.reader]

    def shared_expert_prefix(self, layer: int) -> str | None:
        m = self.spec.shared_expert_module
        return None if m is None else f"{self.moe_prefix(layer)}{m}."

    # -- expert storage
    def expert_name(self, layer: int, expert: int, proj: str) -> str:
        """Per-expert layout: `<experts prefix>E.<stored proj>.weight`, [out, in]."""
        _check_proj(proj)
        return per_expert_name(self.experts_prefix(layer), expert, self.spec.expert_projs[PROJS.index(proj)])

    def fused_tensor_name(self, layer: int, proj: str) -> str:
        """Fused layout: gate_proj and up_proj share `<prefix>gate_up_proj`; `<prefix>down_proj`."""
        _check_proj(proj)
        return fused_name(self.experts_prefix(layer), proj)

    def _weight_names(self, layer: int, proj: str) -> list[str]:
        if self.layout == FUSED:
            return [self.fused_tensor_name(layer, proj)]
        return [self.expert_name(layer, e, proj) for e in range(self.num_experts)]

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

    def expert_shape(self, proj: str) -> tuple[int, ...]:
        """Stored shape of one layer's `proj`: per expert [out, in], fused the whole [E, ...] tensor."""
        E, p, d = self.num_experts, self.moe_intermediate_size, self.hidden_size
        if self.layout == FUSED:
            return self.form.down_shape(E, p, d) if proj == "down_proj" else self.form.gate_up_shape(E, p, d)
        return (d, p) if proj == "down_proj" else (p, d)

    def expert_weight(self, reader: CheckpointReader, layer: int, expert: int, proj: str,
                      dtype: torch.dtype | None = torch.float32) -> torch.Tensor:
        """One expert's `proj` as [out, in] (gate/up [p, d], down [d, p]), FP8 dequantized to dtype."""
        _check_proj(proj)
        if not 0 <= expert < self.num_experts:
            raise CheckpointError(f"layer {layer} has no expert {expert} (num_experts {self.num_experts})",
                                  reader.model_dir)
        if self.layout == PER_EXPERT:
            return reader.get(self.expert_name(layer, expert, proj), dtype)
        name = self.fused_tensor_name(layer, proj)
        want = self.expert_shape(proj)
        shape = reader.info(name).shape
        if tuple(shape[1:]) != want[1:]:
            raise CheckpointError(f"tensor {name} has shape {list(shape)}, expected {list(want)}",
                                  reader.model_dir / reader.info(name).shard)
        one = reader.get_expert(name, expert, dtype)
        if proj == "down_proj":
            return self.form.down(one).contiguous()
        gate, up = self.form.split(one)
        return (gate if proj == "gate_proj" else up).contiguous()  # don't keep the other half alive through a view

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
        name = self.expert_name(layer, 0, proj) if self.layout == PER_EXPERT else self.fused_tensor_name(layer, proj)
        info = reader.info(name)
        scaled = reader.scale_of(name) is not None
        kept = kept_target_dtype(info.dtype, scaled, self.layout == PER_EXPERT)
        if kept is None:
            return self.expert_stack(reader, layer, proj, torch.float32), None
        data = self.expert_stack(reader, layer, proj, None)
        if not scaled:
            return data, None
        first = reader.get(fp8.scale_name(self.expert_name(layer, 0, proj)))
        scales = torch.empty((self.num_experts, *first.shape), dtype=torch.float32)
        scales[0] = first
        for e in range(1, self.num_experts):
            scales[e] = reader.get(fp8.scale_name(self.expert_name(layer, e, proj)))
        return data, scales

    def detect_layout(self, names: list[str], where: Path | None = None) -> str:
        """per_expert or fused, from tensor names; a checkpoint mixing both is refused."""
        return detect_layout(names, where, self.spec)


def kept_target_dtype(stored: str, scaled: bool, per_expert: bool = True) -> torch.dtype | None:
    """The dtype a solver keeps expert targets stored as `stored` (safetensors name) in: bf16, fp16
    and fp32 as they are, block-scaled FP8 with its scales (per-expert layout), anything else None
    (dequantized to fp32). The one rule for expert_stack_stored and the cost estimate."""
    if stored == "F8_E4M3":
        return fp8.FP8_DTYPE if scaled and per_expert else None
    return {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}.get(stored)


def per_expert_name(experts_prefix: str, expert: int, proj: str) -> str:
    """Hub per-expert layout: `<prefix>E.<proj>.weight`, [out, in] (proj as stored)."""
    return f"{experts_prefix}{expert}.{proj}.weight"


def fused_name(experts_prefix: str, proj: str) -> str:
    """Fused layout: gate_proj and up_proj share `<prefix>gate_up_proj`; `<prefix>down_proj`."""
    return experts_prefix + ("down_proj" if proj == "down_proj" else "gate_up_proj")


def _check_proj(proj: str) -> None:
    if proj not in PROJS:
        raise ValueError(f"unknown projection {proj!r}; expected one of {', '.join(PROJS)}")


def _layout_patterns(spec: FamilySpec) -> tuple[re.Pattern, re.Pattern]:
    experts = rf"{_LAYER_RE.pattern}{re.escape(spec.moe_module)}\.experts\."
    projs = "|".join(re.escape(p) for p in spec.expert_projs)
    return re.compile(experts + rf"\d+\.({projs})\.weight$"), re.compile(experts + r"(gate_up|down)_proj$")


def detect_layout(names: list[str], where: Path | None = None, spec: FamilySpec | None = None) -> str:
    """per_expert or fused, from tensor names (spec: the family, default the `mlp.experts.` families);
    a checkpoint mixing both is refused."""
    per_re, fused_re = _layout_patterns(spec or FAMILIES[0])
    per = any(per_re.match(n) for n in names)
    fused = any(fused_re.match(n) for n in names)
    if per and fused:
        raise CheckpointError("checkpoint mixes per-expert and fused expert tensors", where)
    return FUSED if fused else PER_EXPERT


def get_family(config: dict, reader: CheckpointReader | None = None) -> Family:
    """The Family for this config, bound to the reader's tensor names (for the storage layout)."""
    config_path = reader.config_path if reader is not None else None
    spec = find_spec(config)
    if spec is None:
        mt = config.get("model_type")
        if mt in MULTIMODAL:
            raise CheckpointError(f"{mt} config has no valid {MULTIMODAL[mt][0]} (its text model's config)", config_path)
        label = mt or next(iter(config.get("architectures") or []), None) or "unknown"
        raise CheckpointError(f"unsupported model family {label!r} (model_type {mt!r}, architectures "
                              f"{config.get('architectures')!r}); supported: {supported_list()}", config_path)
    return Family(spec, config, reader, config_path)
