"""Which tensors a tiny checkpoint of each family holds: hub names, shapes, and how each is made.

A `Spec` is (name, shape, dtype, kind): kind "linear" (random weight, FP8-quantized in FP8 mode),
"linear16" (random, never quantized: router, embeddings, lm_head), "norm" (ones), "bias" (fp32
router bias), "expert" (structured expert weight), "inv_freq" (Kimi's rotary buffer).
"""

from __future__ import annotations

from dataclasses import dataclass

from ..checkpoint import fp8


@dataclass(frozen=True)
class Spec:
    name: str
    shape: tuple[int, ...]
    kind: str
    layer: int | None = None
    proj: str | None = None
    expert: int | None = None


def stored(spec: Spec, dtype: str, block: tuple[int, int] | None) -> list[tuple[str, str, tuple[int, ...]]]:
    """(name, safetensors dtype, shape) of what `spec` is stored as: `dtype` (e.g. "BF16"), except fp32
    router bias and rotary buffer; with an FP8 `block`, "linear"/"expert" weights are F8_E4M3 with an
    fp32 `weight_scale_inv` per block (per expert `[E, sm, sn]` when fused)."""
    if spec.kind in ("bias", "inv_freq"):
        return [(spec.name, "F32", spec.shape)]
    if block is None or spec.kind not in ("linear", "expert"):
        return [(spec.name, dtype, spec.shape)]
    return [(spec.name, "F8_E4M3", spec.shape), (fp8.scale_name(spec.name), "F32", fp8.scale_shape(spec.shape, block))]


def _experts(pre: str, layer: int, E: int, p: int, d: int, fused: bool) -> list[Spec]:
    if fused:
        return [Spec(pre + "experts.gate_up_proj", (E, 2 * p, d), "expert", layer, "gate_up_proj"),
                Spec(pre + "experts.down_proj", (E, d, p), "expert", layer, "down_proj")]
    out = []
    for e in range(E):
        for proj, shape in (("gate_proj", (p, d)), ("up_proj", (p, d)), ("down_proj", (d, p))):
            out.append(Spec(f"{pre}experts.{e}.{proj}.weight", shape, "expert", layer, proj, e))
    return out


def _mlp(pre: str, inter: int, d: int) -> list[Spec]:
    return [Spec(pre + "gate_proj.weight", (inter, d), "linear"), Spec(pre + "up_proj.weight", (inter, d), "linear"),
            Spec(pre + "down_proj.weight", (d, inter), "linear")]


def qwen3_moe_specs(cfg: dict, fused: bool) -> list[Spec]:
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    hd, H, KV = cfg["head_dim"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    E, p = cfg["num_experts"], cfg["moe_intermediate_size"]
    specs = [Spec("model.embed_tokens.weight", (V, d), "linear16")]
    for i in range(cfg["num_hidden_layers"]):
        pre = f"model.layers.{i}."
        specs += [Spec(pre + "input_layernorm.weight", (d,), "norm"), Spec(pre + "post_attention_layernorm.weight", (d,), "norm"),
                  Spec(pre + "self_attn.q_proj.weight", (H * hd, d), "linear"),
                  Spec(pre + "self_attn.k_proj.weight", (KV * hd, d), "linear"),
                  Spec(pre + "self_attn.v_proj.weight", (KV * hd, d), "linear"),
                  Spec(pre + "self_attn.o_proj.weight", (d, H * hd), "linear"),
                  Spec(pre + "self_attn.q_norm.weight", (hd,), "norm"), Spec(pre + "self_attn.k_norm.weight", (hd,), "norm")]
        moe = i not in cfg["mlp_only_layers"] and E > 0 and (i + 1) % cfg["decoder_sparse_step"] == 0
        if moe:
            specs.append(Spec(pre + "mlp.gate.weight", (E, d), "linear16"))
            specs += _experts(pre + "mlp.", i, E, p, d, fused)
        else:
            specs += _mlp(pre + "mlp.", cfg["intermediate_size"], d)
    specs += [Spec("model.norm.weight", (d,), "norm"), Spec("lm_head.weight", (V, d), "linear16")]
    return specs


def _mla(pre: str, cfg: dict) -> list[Spec]:
    d, H = cfg["hidden_size"], cfg["num_attention_heads"]
    qr, kvr = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    q = [Spec(pre + "self_attn.q_proj.weight", (H * (nope + rope), d), "linear")] if qr is None else [
        Spec(pre + "self_attn.q_a_proj.weight", (qr, d), "linear"),
        Spec(pre + "self_attn.q_a_layernorm.weight", (qr,), "norm"),
        Spec(pre + "self_attn.q_b_proj.weight", (H * (nope + rope), qr), "linear")]
    return q + [Spec(pre + "self_attn.kv_a_proj_with_mqa.weight", (kvr + rope, d), "linear"),
            Spec(pre + "self_attn.kv_a_layernorm.weight", (kvr,), "norm"),
            Spec(pre + "self_attn.kv_b_proj.weight", (H * (nope + v), kvr), "linear"),
            Spec(pre + "self_attn.o_proj.weight", (d, H * v), "linear")]


def _deepseek_layer(i: int, cfg: dict, fused: bool, kimi: bool) -> list[Spec]:
    d, E, p = cfg["hidden_size"], cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    pre = f"model.layers.{i}."
    specs = [Spec(pre + "input_layernorm.weight", (d,), "norm"), Spec(pre + "post_attention_layernorm.weight", (d,), "norm")]
    specs += _mla(pre, cfg)
    if kimi:
        specs.append(Spec(pre + "self_attn.rotary_emb.inv_freq", (cfg["qk_rope_head_dim"] // 2,), "inv_freq"))
    if i >= cfg["first_k_dense_replace"] and i % cfg["moe_layer_freq"] == 0:
        specs += [Spec(pre + "mlp.gate.weight", (E, d), "linear16"), Spec(pre + "mlp.gate.e_score_correction_bias", (E,), "bias")]
        specs += _experts(pre + "mlp.", i, E, p, d, fused)
        specs += _mlp(pre + "mlp.shared_experts.", p * cfg["n_shared_experts"], d)
    else:
        specs += _mlp(pre + "mlp.", cfg["intermediate_size"], d)
    return specs


def deepseek_specs(cfg: dict, fused: bool, kimi: bool, mtp: bool) -> list[Spec]:
    d, V, L = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    specs = [Spec("model.embed_tokens.weight", (V, d), "linear16")]
    for i in range(L):
        specs += _deepseek_layer(i, cfg, fused, kimi)
    specs += [Spec("model.norm.weight", (d,), "norm"), Spec("lm_head.weight", (V, d), "linear16")]
    if mtp:  # DeepSeek-V3's multi-token-prediction layer is stored as one more layer past num_hidden_layers
        pre = f"model.layers.{L}."
        specs += _deepseek_layer(L, {**cfg, "first_k_dense_replace": 0}, fused, kimi)
        specs += [Spec(pre + "embed_tokens.weight", (V, d), "linear16"), Spec(pre + "enorm.weight", (d,), "norm"),
                  Spec(pre + "hnorm.weight", (d,), "norm"), Spec(pre + "eh_proj.weight", (d, 2 * d), "linear16"),
                  Spec(pre + "shared_head.norm.weight", (d,), "norm"), Spec(pre + "shared_head.head.weight", (V, d), "linear16")]
    return specs


# ---- any family of the table: names from its FamilySpec, attention from ATTENTION -------------

# (q/k/v biases, q/k RMSNorm "head"/"full"/None) of the GQA families; "mla": DeepSeek's latent attention
ATTENTION: dict[str, tuple[bool, str | None] | str] = {
    "mixtral": (False, None), "qwen2_moe": (True, None), "olmoe": (False, "full"), "glm4_moe": (True, None),
    "ernie4_5_moe": (False, None), "minimax_m2": (False, "full"), "deepseek_v2": "mla", "gpt_oss": (True, None),
    "llama4": (False, None),  # Llama-4's q/k norm has no weight
}
DENSE_WIDTH = {"llama4": "intermediate_size_mlp"}  # config key of the dense MLP's width (default intermediate_size)
WITH_SINKS = ("gpt_oss",)  # o_proj bias and one attention-sink logit per head
EXPERT_BIASES = ("gpt_oss",)  # fused `gate_up_proj_bias` [E, 2p] and `down_proj_bias` [E, d]


def _gqa(pre: str, cfg: dict, bias: bool, qk_norm: str | None) -> list[Spec]:
    d, H, KV = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // H
    specs = [Spec(pre + "self_attn.q_proj.weight", (H * hd, d), "linear"),
             Spec(pre + "self_attn.k_proj.weight", (KV * hd, d), "linear"),
             Spec(pre + "self_attn.v_proj.weight", (KV * hd, d), "linear"),
             Spec(pre + "self_attn.o_proj.weight", (d, H * hd), "linear")]
    if bias:
        specs += [Spec(pre + f"self_attn.{x}_proj.bias", (n * hd,), "linear16") for x, n in (("q", H), ("k", KV), ("v", KV))]
    if qk_norm is not None:
        specs += [Spec(pre + f"self_attn.{x}_norm.weight", (hd if qk_norm == "head" else n * hd,), "norm")
                  for x, n in (("q", H), ("k", KV))]
    return specs


def _shared_width(cfg: dict) -> int:
    if cfg.get("model_type") == "llama4_text":  # one shared expert as wide as a routed one
        return cfg["intermediate_size"]
    if cfg.get("shared_expert_intermediate_size"):
        return cfg["shared_expert_intermediate_size"]
    n = cfg.get("n_shared_experts") or cfg.get("moe_num_shared_experts") or 0
    return cfg["moe_intermediate_size"] * n


def family_specs(cfg: dict, fused: bool) -> list[Spec]:
    """A tiny checkpoint of any family: attention per ATTENTION, MoE tensors named by its FamilySpec."""
    from ..checkpoint.families import BIAS_SUFFIX, get_family

    fam = get_family(cfg)
    spec = fam.spec
    d, V = cfg["hidden_size"], cfg["vocab_size"]
    E, p = fam.num_experts, fam.moe_intermediate_size
    attn = ATTENTION[spec.name]
    specs = [Spec("model.embed_tokens.weight", (V, d), "linear16")]
    for i in range(fam.num_layers):
        pre = f"model.layers.{i}."
        specs += [Spec(pre + "input_layernorm.weight", (d,), "norm"), Spec(pre + "post_attention_layernorm.weight", (d,), "norm")]
        specs += _mla(pre, cfg) if attn == "mla" else _gqa(pre, cfg, *attn)
        if spec.name in WITH_SINKS:
            specs += [Spec(pre + "self_attn.o_proj.bias", (d,), "linear16"),
                      Spec(pre + "self_attn.sinks", (cfg["num_attention_heads"],), "linear16")]
        moe = fam.moe_prefix(i)
        if not fam.is_moe_layer(i):
            specs += _mlp(moe, cfg[DENSE_WIDTH.get(spec.name, "intermediate_size")], d)
            continue
        for t in spec.router_tensors:
            shape = (E, d) if t == spec.router_tensors[0] else ((1, E) if t.startswith("moe_statics.") else (E,))
            specs.append(Spec(moe + t, shape, "bias" if t.endswith("e_score_correction_bias") else "linear16"))
        if fused or spec.fused_form.in_first:  # gpt-oss and Llama-4 publish only the fused hub form
            form = spec.fused_form
            specs += [Spec(fam.fused_tensor_name(i, "gate_proj"), form.gate_up_shape(E, p, d), "expert", i, "gate_up_proj"),
                      Spec(fam.fused_tensor_name(i, "down_proj"), form.down_shape(E, p, d), "expert", i, "down_proj")]
            if spec.name in EXPERT_BIASES:
                specs += [Spec(fam.fused_tensor_name(i, "gate_proj") + BIAS_SUFFIX, (E, 2 * p), "linear16"),
                          Spec(fam.fused_tensor_name(i, "down_proj") + BIAS_SUFFIX, (E, d), "linear16")]
        else:
            specs += [Spec(fam.expert_name(i, e, proj), (d, p) if proj == "down_proj" else (p, d), "expert", i, proj, e)
                      for e in range(E) for proj in ("gate_proj", "up_proj", "down_proj")]
        shared = fam.shared_expert_prefix(i)
        if shared is not None:
            specs += _mlp(shared, _shared_width(cfg), d)
            if spec.shared_expert_gate is not None:
                specs.append(Spec(moe + spec.shared_expert_gate, (1, d), "linear16"))
    specs.append(Spec("model.norm.weight", (d,), "norm"))
    if not cfg.get("tie_word_embeddings"):
        specs.append(Spec("lm_head.weight", (V, d), "linear16"))
    return specs


def llama4_vision_specs(cfg: dict) -> list[Spec]:
    """A Llama-4 multimodal checkpoint's vision tower and projector (kept as stored by every command)."""
    v, d = cfg["vision_config"], cfg["text_config"]["hidden_size"]
    h, inter, patch = v["hidden_size"], v["intermediate_size"], v["patch_size"]
    specs = [Spec("vision_model.patch_embedding.linear.weight", (h, v["num_channels"] * patch * patch), "linear16"),
             Spec("vision_model.class_embedding", (h,), "linear16"),
             Spec("vision_model.positional_embedding_vlm", ((v["image_size"] // patch) ** 2 + 1, h), "linear16")]
    for x in ("pre", "post"):
        specs += [Spec(f"vision_model.layernorm_{x}.weight", (h,), "norm"),
                  Spec(f"vision_model.layernorm_{x}.bias", (h,), "linear16")]
    for i in range(v["num_hidden_layers"]):
        pre = f"vision_model.model.layers.{i}."
        for x in ("q", "k", "v", "o"):
            specs += [Spec(pre + f"self_attn.{x}_proj.weight", (h, h), "linear16"),
                      Spec(pre + f"self_attn.{x}_proj.bias", (h,), "linear16")]
        for x in ("input_layernorm", "post_attention_layernorm"):
            specs += [Spec(pre + f"{x}.weight", (h,), "norm"), Spec(pre + f"{x}.bias", (h,), "linear16")]
        specs += [Spec(pre + "mlp.fc1.weight", (inter, h), "linear16"), Spec(pre + "mlp.fc1.bias", (inter,), "linear16"),
                  Spec(pre + "mlp.fc2.weight", (h, inter), "linear16"), Spec(pre + "mlp.fc2.bias", (h,), "linear16")]
    specs += [Spec("vision_model.vision_adapter.mlp.fc1.weight", (v["projector_input_dim"], inter), "linear16"),
              Spec("vision_model.vision_adapter.mlp.fc2.weight", (v["projector_output_dim"],) * 2, "linear16"),
              Spec("multi_modal_projector.linear_1.weight", (d, v["vision_output_dim"]), "linear16")]
    return specs
