"""Runtime view of a model config: one dataclass for both decoder families, any key spelling.

Released hub configs and transformers 5.x configs spell some keys differently (`rope_scaling` vs
`rope_parameters`, `num_experts` vs `num_local_experts` vs `n_routed_experts`); the decoders only
ever see the normalised values below.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from ..checkpoint import families
from ..errors import ConfigError

DEEPSEEK_TYPES = ("deepseek_v3", "kimi_k2")
QWEN_TYPES = ("qwen3_moe",)


def _get(cfg: dict, *keys: str, default=None):
    for k in keys:
        if cfg.get(k) is not None:
            return cfg[k]
    return default


@dataclass
class RuntimeConfig:
    family: str  # "qwen3_moe" | "deepseek_v3" | "kimi_k2"
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
    sliding_window: int | None = None
    # DeepSeek / Kimi only
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    n_shared_experts: int = 0
    rope_interleave: bool = True
    max_position_embeddings: int = 4096
    mobe: dict | None = None

    @property
    def is_deepseek(self) -> bool:
        return self.family in DEEPSEEK_TYPES


def _rope(cfg: dict) -> dict:
    rp = dict(families.rope_config(cfg) or {})
    rp["rope_type"] = rp.get("rope_type") or rp.get("type") or "default"
    rp.setdefault("rope_theta", _get(cfg, "rope_theta", default=10000.0))
    if rp["rope_type"] not in ("default", "yarn", "linear"):
        raise ConfigError(f"rope type {rp['rope_type']!r} is not supported (default, linear, yarn)")
    if rp["rope_type"] == "yarn":
        rp.setdefault("original_max_position_embeddings",
                      _get(cfg, "original_max_position_embeddings", "max_position_embeddings", default=4096))
    return rp


def parse_config(cfg: dict, config_path: Path | None = None) -> RuntimeConfig:
    """Normalise a config.json dict; raises CheckpointError (via get_family) for unknown families."""
    fam = families.get_family(cfg)
    name = fam.name
    eos = cfg.get("eos_token_id")
    eos_ids = [] if eos is None else ([int(eos)] if isinstance(eos, int) else [int(x) for x in eos])
    heads = int(cfg["num_attention_heads"])
    common = RuntimeConfig(
        family=name, vocab_size=int(cfg["vocab_size"]), hidden_size=fam.hidden_size,
        intermediate_size=int(_get(cfg, "intermediate_size", default=0)),
        moe_intermediate_size=fam.moe_intermediate_size, num_layers=fam.num_layers, num_heads=heads,
        num_kv_heads=int(_get(cfg, "num_key_value_heads", default=heads)),
        head_dim=fam.hidden_size // heads,  # each family's own below
        rms_norm_eps=float(_get(cfg, "rms_norm_eps", default=1e-6)), num_experts=fam.num_experts,
        top_k=fam.top_k, norm_topk_prob=bool(_get(cfg, "norm_topk_prob", default=name != "qwen3_moe")),
        moe_layers=fam.moe_layers(), rope=_rope(cfg), tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        eos_token_ids=eos_ids, max_position_embeddings=int(_get(cfg, "max_position_embeddings", default=4096)),
        mobe=cfg.get("mobe"),
    )
    if name in QWEN_TYPES:
        if cfg.get("norm_topk_prob") is None:
            common.norm_topk_prob = False  # transformers' Qwen3MoeConfig default
        window = cfg.get("sliding_window") if cfg.get("use_sliding_window") else None
        return replace(common, head_dim=int(_get(cfg, "head_dim", default=common.head_dim)), sliding_window=window)
    nope, rope = int(cfg["qk_nope_head_dim"]), int(cfg["qk_rope_head_dim"])
    return replace(
        common, head_dim=nope + rope, q_lora_rank=cfg.get("q_lora_rank"), kv_lora_rank=int(cfg["kv_lora_rank"]),
        qk_nope_head_dim=nope, qk_rope_head_dim=rope, v_head_dim=int(cfg["v_head_dim"]),
        n_group=int(_get(cfg, "n_group", default=1)), topk_group=int(_get(cfg, "topk_group", default=1)),
        routed_scaling_factor=float(_get(cfg, "routed_scaling_factor", default=1.0)),
        n_shared_experts=int(_get(cfg, "n_shared_experts", default=0)),
        rope_interleave=bool(_get(cfg, "rope_interleave", default=True)))
