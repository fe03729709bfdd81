"""config.json for tiny models, with each family's real keys (as in the released hub configs)."""

from __future__ import annotations

MXFP4_QUANT: dict[str, object] = {  # gpt-oss's released quantization_config
    "quant_method": "mxfp4",
    "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
FP8_QUANT: dict[str, object] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]}


def qwen3_moe_config(*, num_layers: int, num_experts: int, hidden: int, moe_inter: int, vocab: int,
                     dtype: str) -> dict:
    heads, kv_heads = 4, 2
    return {
        "architectures": ["Qwen3MoeForCausalLM"],
        "model_type": "qwen3_moe",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": num_layers,
        "num_attention_heads": heads,
        "num_key_value_heads": kv_heads,
        "head_dim": hidden // heads,
        "hidden_act": "silu",
        "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "num_experts": num_experts,
        "num_experts_per_tok": 2,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [0],  # one dense layer, as a test of the layer selection
        "output_router_logits": False,
        "router_aux_loss_coef": 0.001,
        "use_sliding_window": False,
        "sliding_window": None,
        "tie_word_embeddings": False,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": dtype,
        "transformers_version": "4.51.0",
    }


def deepseek_v3_config(*, num_layers: int, num_experts: int, hidden: int, moe_inter: int, vocab: int,
                       dtype: str, kimi: bool, fp8: bool) -> dict:
    heads = 4
    rank_unit = 64 if fp8 else 16
    cfg: dict[str, object] = {
        "architectures": ["DeepseekV3ForCausalLM"],
        "model_type": "kimi_k2" if kimi else "deepseek_v3",
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "moe_intermediate_size": moe_inter,
        "num_hidden_layers": num_layers,
        "num_nextn_predict_layers": 1,
        "num_attention_heads": heads,
        "num_key_value_heads": heads,
        "n_shared_experts": 1,
        "n_routed_experts": num_experts,
        "ep_size": 1,
        "routed_scaling_factor": 2.827 if kimi else 2.5,
        "kv_lora_rank": rank_unit,
        "q_lora_rank": 2 * rank_unit,
        "qk_rope_head_dim": 8,
        "v_head_dim": 16,
        "qk_nope_head_dim": 16,
        "topk_method": "noaux_tc",
        "n_group": 1 if kimi else 2,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "moe_layer_freq": 1,
        "first_k_dense_replace": 1,
        "norm_topk_prob": True,
        "scoring_func": "sigmoid",
        "hidden_act": "silu",
        "max_position_embeddings": 32 * (32 if kimi else 40),  # = factor * original, as transformers checks
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-6,
        "use_cache": True,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "tie_word_embeddings": False,
        "rope_theta": 50000.0 if kimi else 10000.0,
        "rope_scaling": {
            "type": "yarn",
            "factor": 32.0 if kimi else 40.0,
            "original_max_position_embeddings": 32,
            "beta_fast": 1.0 if kimi else 32,
            "beta_slow": 1.0,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
        "attention_bias": False,
        "attention_dropout": 0.0,
        "torch_dtype": dtype,
        "transformers_version": "4.33.1",
    }
    if fp8:
        cfg["quantization_config"] = dict(FP8_QUANT)
    return cfg


def _common(arch: str, model_type: str, *, num_layers: int, hidden: int, vocab: int, dtype: str) -> dict:
    """Keys every released config of these families carries (values tiny)."""
    return {"architectures": [arch], "model_type": model_type, "vocab_size": vocab, "hidden_size": hidden,
            "num_hidden_layers": num_layers, "num_attention_heads": 4, "num_key_value_heads": 2,
            "hidden_act": "silu", "max_position_embeddings": 512, "initializer_range": 0.02, "use_cache": True,
            "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False, "attention_dropout": 0.0,
            "torch_dtype": dtype}


def family_config(family: str, *, num_layers: int, num_experts: int, hidden: int, moe_inter: int, vocab: int,
                  dtype: str) -> dict:
    """config.json of a tiny `family` model with the keys of its released configs (Mixtral-8x7B,
    Qwen1.5-MoE-A2.7B, OLMoE-1B-7B-0924, ...); the first layer is dense where the family allows it."""
    def common(arch: str, model_type: str) -> dict:
        return _common(arch, model_type, num_layers=num_layers, hidden=hidden, vocab=vocab, dtype=dtype)

    if family == "mixtral":
        return {**common("MixtralForCausalLM", "mixtral"), "intermediate_size": moe_inter,
                "num_local_experts": num_experts, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
                "sliding_window": None, "output_router_logits": False, "router_aux_loss_coef": 0.02}
    if family == "qwen2_moe":
        return {**common("Qwen2MoeForCausalLM", "qwen2_moe"), "intermediate_size": 2 * hidden,
                "moe_intermediate_size": moe_inter, "shared_expert_intermediate_size": 2 * moe_inter,
                "num_experts": num_experts, "num_experts_per_tok": 2, "norm_topk_prob": False,
                "decoder_sparse_step": 1, "mlp_only_layers": [0], "rms_norm_eps": 1e-6, "rope_theta": 1e6,
                "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": num_layers,
                "output_router_logits": False, "router_aux_loss_coef": 0.001}
    if family == "olmoe":
        return {**common("OlmoeForCausalLM", "olmoe"), "intermediate_size": moe_inter,
                "num_experts": num_experts, "num_experts_per_tok": 2, "norm_topk_prob": False, "clip_qkv": None,
                "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "rope_scaling": None, "attention_bias": False,
                "pad_token_id": 1, "output_router_logits": False, "router_aux_loss_coef": 0.01}
    if family == "deepseek_v2":  # DeepSeek-V2-Lite's keys: no q LoRA, softmax router, YaRN
        return {**common("DeepseekV2ForCausalLM", "deepseek_v2"), "num_key_value_heads": 4, "intermediate_size": 2 * hidden,
                "moe_intermediate_size": moe_inter, "n_routed_experts": num_experts, "n_shared_experts": 2,
                "num_experts_per_tok": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1, "n_group": 1, "topk_group": 1,
                "topk_method": "greedy", "scoring_func": "softmax", "norm_topk_prob": False, "routed_scaling_factor": 1.0,
                "q_lora_rank": None, "kv_lora_rank": 16, "qk_nope_head_dim": 16, "qk_rope_head_dim": 8, "v_head_dim": 16,
                "aux_loss_alpha": 0.001, "seq_aux": True, "ep_size": 1, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                "max_position_embeddings": 40 * 32,
                "rope_scaling": {"type": "yarn", "factor": 40.0, "original_max_position_embeddings": 32, "beta_fast": 32,
                                 "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}}
    if family == "glm4_moe":  # GLM-4.5-Air's keys: partial RoPE, sigmoid router with correction bias
        return {**common("Glm4MoeForCausalLM", "glm4_moe"), "head_dim": hidden // 4, "intermediate_size": 2 * hidden,
                "moe_intermediate_size": moe_inter, "n_routed_experts": num_experts, "n_shared_experts": 1,
                "num_experts_per_tok": 2, "first_k_dense_replace": 1, "n_group": 1, "topk_group": 1,
                "norm_topk_prob": True, "routed_scaling_factor": 1.0, "partial_rotary_factor": 0.5, "use_qk_norm": False,
                "attention_bias": True, "num_nextn_predict_layers": 0, "rms_norm_eps": 1e-5, "rope_theta": 1e6}
    if family == "ernie4_5_moe":  # ERNIE-4.5-21B-A3B-PT's keys
        return {**common("Ernie4_5_MoeForCausalLM", "ernie4_5_moe"), "head_dim": hidden // 4,
                "intermediate_size": 2 * hidden, "moe_intermediate_size": moe_inter, "moe_num_experts": num_experts,
                "moe_num_shared_experts": 1, "moe_k": 2, "moe_layer_start_index": 1, "moe_layer_end_index": num_layers - 1,
                "moe_layer_interval": 1, "moe_norm_min": 1e-12, "use_bias": False, "rms_norm_eps": 1e-5,
                "rope_theta": 500000.0, "tie_word_embeddings": True, "pad_token_id": 0}
    if family == "minimax_m2":  # MiniMax-M2's keys: rotary_dim, q/k norm over the projection, routing bias
        return {**common("MiniMaxM2ForCausalLM", "minimax_m2"), "head_dim": hidden // 4, "intermediate_size": moe_inter,
                "num_local_experts": num_experts, "num_experts_per_tok": 2, "rotary_dim": hidden // 8,
                "use_qk_norm": True, "qk_norm_type": "per_layer", "scoring_func": "sigmoid", "use_routing_bias": True,
                "rms_norm_eps": 1e-6, "rope_theta": 5e6, "sliding_window": None, "output_router_logits": False,
                "router_aux_loss_coef": 0.001}
    if family == "gpt_oss":  # gpt-oss-20b's keys: alternating sliding/full layers, YaRN, clamped SwiGLU
        return {**common("GptOssForCausalLM", "gpt_oss"), "head_dim": hidden // 4, "intermediate_size": moe_inter,
                "num_local_experts": num_experts, "num_experts_per_tok": 2, "experts_per_token": 2,
                "layer_types": ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)],
                "sliding_window": 4, "attention_bias": True, "swiglu_limit": 7.0, "rms_norm_eps": 1e-5,
                "rope_theta": 150000, "initial_context_length": 32, "max_position_embeddings": 32 * 32,
                "rope_scaling": {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                 "truncate": False, "original_max_position_embeddings": 32},
                "router_aux_loss_coef": 0.9, "output_router_logits": False, "pad_token_id": 0}
    if family == "llama4":  # Llama-4-Scout's text_config keys; Maverick's interleaved dense/MoE layers
        return {**common("Llama4ForCausalLM", "llama4_text"), "head_dim": hidden // 4, "intermediate_size": moe_inter,
                "intermediate_size_mlp": 2 * hidden, "num_local_experts": num_experts, "num_experts_per_tok": 1,
                "interleave_moe_layer_step": 2, "no_rope_layers": [], "no_rope_layer_interval": 2,
                "attention_chunk_size": 4, "attn_temperature_tuning": True, "attn_scale": 0.1, "floor_scale": 2,
                "use_qk_norm": True, "attention_bias": False, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
                "rope_scaling": {"rope_type": "llama3", "factor": 16.0, "high_freq_factor": 1.0, "low_freq_factor": 1.0,
                                 "original_max_position_embeddings": 16},
                "router_aux_loss_coef": 0.001, "router_jitter_noise": 0.0, "output_router_logits": False,
                "pad_token_id": 0}
    raise ValueError(f"no tiny config for family {family!r}")


def llama4_multimodal_config(text: dict) -> dict:
    """The released Llama-4 config around a tiny text config: Llama4ForConditionalGeneration with
    the text model under `text_config` and a one-layer vision tower (Llama-4-Scout's keys)."""
    vision = {"model_type": "llama4_vision_model", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "num_channels": 3, "image_size": 28, "patch_size": 14, "norm_eps": 1e-5,
              "hidden_act": "gelu", "pixel_shuffle_ratio": 0.5, "projector_input_dim": 32, "projector_output_dim": 32,
              "vision_output_dim": 32, "multi_modal_projector_bias": False, "vision_feature_select_strategy": "default",
              "rope_theta": 10000, "attention_dropout": 0.0, "projector_dropout": 0.0, "initializer_range": 0.02}
    return {"architectures": ["Llama4ForConditionalGeneration"], "model_type": "llama4",
            "text_config": {k: v for k, v in text.items() if k not in ("architectures", "torch_dtype")},
            "vision_config": vision, "boi_token_index": 200080, "eoi_token_index": 200081,
            "image_token_index": 200092, "tie_word_embeddings": False, "torch_dtype": text["torch_dtype"]}
