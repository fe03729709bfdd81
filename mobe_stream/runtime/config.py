"""Runtime view of a model config: one dataclass for every family, any key spelling.

Released hub configs and transformers 5.x configs spell some keys differently (`rope_scaling` vs
`rope_parameters`, `num_experts` vs `num_local_experts` vs `n_routed_experts`); the decoders only
ever see the normalised values below. What differs between families is a few fields (which
attention, which router, which q/k norm, how much of a head is rotated, which GLU) set by one small
function per family (`_FAMILY`).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..checkpoint import families
from ..errors import ConfigError

DEEPSEEK_TYPES = ("deepseek_v3", "kimi_k2")


def _get(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


@dataclass
class RuntimeConfig:
    family: str  # a families.FAMILIES name
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    moe_intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    num_experts: int
    top_k: int
    norm_topk_prob: bool
    moe_layers: list[int]
    rope: dict  # normalised: rope_type, rope_theta (+ yarn keys)
    tie_word_embeddings: bool = False
    eos_token_ids: list[int] = field(default_factory=list)
    sliding_window: int | None = None  # every layer's window (the model-wide mask)
    layer_windows: dict[int, int] = field(default_factory=dict)  # windows of some layers only (gpt-oss layer_types)
    layer_chunks: dict[int, int] = field(default_factory=dict)  # chunked attention: layer -> chunk (Llama-4)
    nope_layers: frozenset[int] = frozenset()  # layers without RoPE (Llama-4)
    attn_temperature: tuple[float, float] | None = None  # NoPE layers' q scaling (attn_scale, floor_scale), Llama-4
    weights_on_inputs: bool = False  # routing weights scale each expert's input, not its output (Llama-4)
    router: str = "softmax"  # a key of moe.ROUTE
    attention: str = "gqa"  # "gqa" | "mla"
    qk_norm: str | None = None  # "head": RMSNorm per q/k head; "full": over the whole q/k projection;
    # "l2": weightless RMS norm per head after RoPE, in the RoPE layers only (Llama-4)
    rotary_dim: int = 0  # leading dims of a head that are rotated (partial RoPE); 0: all
    clip_qkv: float | None = None  # OLMoE: q, k, v clamped to +-clip_qkv
    glu: str = "silu"  # routed experts' GLU: "silu" (SwiGLU) or "clamped" (gpt-oss, swiglu_limit)
    swiglu_limit: float = 7.0
    prefix: str = ""  # stored names' prefix of the text model ("language_model." in a multimodal checkpoint)
    norm_min: float = 1e-20  # floor of the top-k weights' sum when renormalising
    # MLA (DeepSeek-V2/V3, Kimi-K2) only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    rope_interleave: bool = False  # RoPE on neighbouring pairs (DeepSeek, ERNIE) instead of halves
    max_position_embeddings: int = 4096
    mobe: dict | None = None

    @property
    def spec(self) -> families.FamilySpec:
        return families.spec_named(self.family)

    @property
    def is_deepseek(self) -> bool:
        return self.family in DEEPSEEK_TYPES

    @property
    def rot_dim(self) -> int:
        """Dims of a head that RoPE rotates (MLA: the rope part; GQA: all, or the partial share)."""
        return self.qk_rope_head_dim if self.attention == "mla" else (self.rotary_dim or self.head_dim)


def _rope(cfg: dict) -> dict:
    rp = dict(families.rope_config(cfg) or {})
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    rp.setdefault("rope_theta", _get(cfg, "rope_theta", default=10000.0))
    if rp["rope_type"] not in ("default", "yarn", "linear", "llama3"):
        raise ConfigError(f"rope type {rp['rope_type']!r} is not supported (default, linear, yarn, llama3)")
    if rp["rope_type"] == "yarn":
        rp.setdefault("original_max_position_embeddings",
                      _get(cfg, "original_max_position_embeddings", "max_position_embeddings", default=4096))
    return rp


def parse_config(cfg: dict, config_path: Path | None = None) -> RuntimeConfig:
    """Normalise a config.json dict; raises CheckpointError (via get_family) for unknown families.
    A multimodal checkpoint is read as its text model (families.text_view)."""
    fam = families.get_family(cfg)
    cfg = fam.config
    name = fam.name
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
    heads = int(cfg["num_attention_heads"])
    common = RuntimeConfig(
        family=name, vocab_size=int(cfg["vocab_size"]), hidden_size=fam.hidden_size,
        intermediate_size=int(_get(cfg, "intermediate_size", default=0)),
        moe_intermediate_size=fam.moe_intermediate_size, num_layers=fam.num_layers, num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=int(_get(cfg, "head_dim", default=fam.hidden_size // heads)),
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)), num_experts=fam.num_experts,
        top_k=fam.top_k, norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=False)),
        moe_layers=fam.moe_layers(), rope=_rope(cfg), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids, max_position_embeddings=int(_get(cfg, "max_position_embeddings", default=4096)),
        mobe=cfg.get("mobe"), prefix=fam.prefix,
    )
    return _FAMILY[name](cfg, common, config_path)


def _window(cfg: dict) -> int | None:
    return cfg.get("sliding_window") if cfg.get("use_sliding_window") else None


def _partial(cfg: dict, head_dim: int, default: float = 1.0) -> int:
    """Rotated dims of a head: `rotary_dim` (MiniMax-M2's released configs) or partial_rotary_factor."""
    if cfg.get("rotary_dim"):
        return int(cfg["rotary_dim"])
    factor = _get(cfg, "partial_rotary_factor", default=(families.rope_config(cfg) or {}).get("partial_rotary_factor"))
    return int(head_dim * float(default if factor is None else factor))


def _qwen3(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    return replace(c, qk_norm="head", sliding_window=_window(cfg))


def _qwen2(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    if cfg.get("use_sliding_window"):
        raise ConfigError("qwen2_moe with use_sliding_window (per-layer windows) is not supported", where)
    return c


def _mixtral(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    return replace(c, norm_topk_prob=True, sliding_window=cfg.get("sliding_window"))  # always renormalised


def _olmoe(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    clip = cfg.get("clip_qkv")
    return replace(c, qk_norm="full", clip_qkv=None if clip is None else float(clip))


def _minimax_m2(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    return replace(c, qk_norm="full", rotary_dim=_partial(cfg, c.head_dim), router="sigmoid_grouped",
                   norm_topk_prob=True)


def _glm4_moe(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    return replace(c, qk_norm="head" if cfg.get("use_qk_norm") else None, rotary_dim=_partial(cfg, c.head_dim, 0.5),
                   router="sigmoid_grouped", norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=True)),
                   n_group=int(_get(cfg, "n_group", default=1)), topk_group=int(_get(cfg, "topk_group", default=1)),
                   routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)))


def _ernie(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    if cfg.get("use_bias"):
        raise ConfigError("ernie4_5_moe with use_bias is not supported (released models have none)", where)
    return replace(c, router="softmax_biased", rope_interleave=True, norm_topk_prob=True,
                   norm_min=float(_get(cfg, "moe_norm_min", default=1e-12)),
                   tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _mla(cfg: dict, c: RuntimeConfig) -> RuntimeConfig:
    nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
    return replace(
        c, attention="mla", head_dim=nope + rope, q_lora_rank=cfg.get("q_lora_rank"),
        kv_lora_rank=int(cfg["kv_lora_rank"]), qk_nope_head_dim=nope, qk_rope_head_dim=rope,
        v_head_dim=int(cfg["v_head_dim"]), n_group=int(_get(cfg, "n_group", default=1)),
        topk_group=int(_get(cfg, "topk_group", default=1)),
        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)),
        n_shared_experts=int(_get(cfg, "n_shared_experts", default=0)))


def _deepseek_v3(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    return replace(_mla(cfg, c), router="sigmoid_grouped", norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=True)),
                   rope_interleave=bool(_get(cfg, "rope_interleave", default=True)))


def _deepseek_v2(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    method = _get(cfg, "topk_method", default="greedy")
    if method not in ("greedy", "group_limited_greedy"):
        raise ConfigError(f"deepseek_v2 topk_method {method!r} is not supported (greedy, group_limited_greedy)", where)
    out = replace(_mla(cfg, c), router="softmax_grouped", rope_interleave=True)  # V2's complex RoPE pairs neighbours
    return out if method == "group_limited_greedy" else replace(out, n_group=1, topk_group=1)


GPT_OSS_ALPHA = 1.702  # the clamped SwiGLU's sigmoid gain (moe.clamped_glu)


def _gpt_oss(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    """Clamped SwiGLU with expert biases, router with bias (top-k logits, softmax over the k), attention
    sinks (read from the checkpoint) and sliding windows on the layers `layer_types` names (transformers'
    default: every other layer from the first)."""
    alpha = float(_get(cfg, "swiglu_alpha", default=GPT_OSS_ALPHA))
    if alpha != GPT_OSS_ALPHA:
        raise ConfigError(f"gpt_oss swiglu_alpha {alpha} is not supported (released models use {GPT_OSS_ALPHA})", where)
    kinds = cfg.get("layer_types") or ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(c.num_layers)]
    unknown = set(kinds) - {"sliding_attention", "full_attention"}
    if unknown or len(kinds) != c.num_layers:
        raise ConfigError(f"gpt_oss layer_types must name sliding_attention/full_attention for each of "
                          f"{c.num_layers} layers (got {kinds!r})", where)
    window = cfg.get("sliding_window")
    windows = {i: int(window) for i, k in enumerate(kinds) if k == "sliding_attention"} if window else {}
    return replace(c, router="topk_softmax", glu="clamped", swiglu_limit=float(_get(cfg, "swiglu_limit", default=7.0)),
                   layer_windows=windows)


def _llama4(cfg: dict, c: RuntimeConfig, where: Path | None) -> RuntimeConfig:
    """Llama-4 text: RoPE on neighbouring pairs except in the NoPE layers (`no_rope_layers[i] == 0`,
    default every no_rope_layer_interval-th), L2 q/k norm in the RoPE layers, attention temperature
    tuning in the NoPE layers, chunked attention in the layers `layer_types` names (default: the RoPE
    ones), router sigmoid(top-k logits) applied to the experts' inputs, a shared expert."""
    interval = int(_get(cfg, "no_rope_layer_interval", default=4))
    rope_on = cfg.get("no_rope_layers") or [int((i + 1) % interval != 0) for i in range(c.num_layers)]
    kinds = cfg.get("layer_types") or ["chunked_attention" if r else "full_attention" for r in rope_on]
    if len(rope_on) != c.num_layers or len(kinds) != c.num_layers or set(kinds) - {"chunked_attention", "full_attention"}:
        raise ConfigError(f"llama4 no_rope_layers / layer_types must give one entry per layer ({c.num_layers}) and "
                          f"layer_types only chunked_attention/full_attention (got {rope_on!r}, {kinds!r})", where)
    chunk = cfg.get("attention_chunk_size")
    temperature = (float(_get(cfg, "attn_scale", default=0.1)), float(_get(cfg, "floor_scale", default=8192)))
    return replace(c, router="topk_sigmoid", weights_on_inputs=True, rope_interleave=True,
                   qk_norm="l2" if _get(cfg, "use_qk_norm", default=True) else None,
                   nope_layers=frozenset(i for i, r in enumerate(rope_on) if not r),
                   layer_chunks={i: int(chunk) for i, k in enumerate(kinds) if k == "chunked_attention"} if chunk else {},
                   attn_temperature=temperature if _get(cfg, "attn_temperature_tuning", default=True) else None)


_FAMILY = {"qwen3_moe": _qwen3, "qwen2_moe": _qwen2, "mixtral": _mixtral, "olmoe": _olmoe,
           "minimax_m2": _minimax_m2, "glm4_moe": _glm4_moe, "ernie4_5_moe": _ernie,
           "deepseek_v3": _deepseek_v3, "kimi_k2": _deepseek_v3, "deepseek_v2": _deepseek_v2,
           "gpt_oss": _gpt_oss, "llama4": _llama4}
