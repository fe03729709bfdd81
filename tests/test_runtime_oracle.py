"""Oracle: our plain-torch decoders against transformers on the same tiny random fp32 weights."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mobe_stream.runtime.model import load_model  # noqa: E402

from .helpers import hf_text_logits  # noqa: E402

SEQS = [[5, 17, 3, 99, 42, 7, 61, 8, 250, 11], [1, 2, 3]]


def _qwen(tmp_path):
    cfg = transformers.Qwen3MoeConfig(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[1], max_position_embeddings=128,
        rope_theta=10000.0, tie_word_embeddings=False)
    return cfg


def _deepseek(tmp_path, model_type="deepseek_v3", q_lora=32, n_group=2, topk_group=1):
    cfg = transformers.DeepseekV3Config(
        vocab_size=256, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=4, n_shared_experts=1, n_routed_experts=8,
        routed_scaling_factor=2.5, kv_lora_rank=16, q_lora_rank=q_lora, qk_rope_head_dim=8, v_head_dim=16,
        qk_nope_head_dim=16, n_group=n_group, topk_group=topk_group, num_experts_per_tok=2,
        first_k_dense_replace=1, norm_topk_prob=True, max_position_embeddings=40 * 32,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32, "beta_slow": 1,
                         "mscale": 1.0, "mscale_all_dim": 1.0},
        tie_word_embeddings=False)
    return cfg


def _build(cfg, tmp_path, seed=0, model_type=None):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # non-trivial norms and router bias, so those code paths are checked too
        for n, p in model.named_parameters():
            if n.endswith("norm.weight") or n.endswith("layernorm.weight"):
                p.add_(torch.randn_like(p) * 0.1)
        for n, b in [*model.named_buffers(), *model.named_parameters()]:
            if n.endswith("e_score_correction_bias") or n.endswith(("experts.gate_up_proj_bias", "experts.down_proj_bias")):
                b.copy_(torch.randn_like(b) * 0.05)  # gpt-oss's expert biases start at zero
    out = tmp_path / "model"
    model.save_pretrained(out)
    if model_type:  # same weights, config says kimi_k2: must run through our DeepSeek path
        c = json.loads((out / "config.json").read_text())
        c["model_type"] = model_type
        (out / "config.json").write_text(json.dumps(c))
    return model, out


def _ref_logits(model, ids):
    with torch.no_grad():
        return hf_text_logits(model, torch.tensor([ids]))[0].float()


def _close(a, b, tol=1e-4):
    err = (a - b).abs().max() / b.abs().max()
    assert err < tol, f"relative error {err:.2e}"


def _check(model, out_dir, **kw):
    ours = load_model(out_dir, dtype=torch.float32, **kw)
    try:
        for ids in SEQS:
            ref = _ref_logits(model, ids)
            _close(ours(torch.tensor([ids]))[0], ref)
            cache = ours.new_cache()  # prefill 4, then one token at a time
            parts = [ours(torch.tensor([ids[:4]]), cache)[0]]
            for t in ids[4:]:
                parts.append(ours(torch.tensor([[t]]), cache)[0])
            _close(torch.cat(parts), ref)
    finally:
        ours.close()


def test_qwen3_moe_matches_transformers(tmp_path):
    model, out = _build(_qwen(tmp_path), tmp_path)
    _check(model, out)


def test_deepseek_v3_matches_transformers(tmp_path):
    model, out = _build(_deepseek(tmp_path), tmp_path)
    _check(model, out)


def test_deepseek_v3_without_q_lora(tmp_path):
    model, out = _build(_deepseek(tmp_path, q_lora=None, n_group=4, topk_group=2), tmp_path, seed=1)
    _check(model, out)


def test_kimi_k2_runs_through_deepseek_path(tmp_path):
    model, out = _build(_deepseek(tmp_path, n_group=1, topk_group=1), tmp_path, seed=2, model_type="kimi_k2")
    _check(model, out)


def _fuse(out):
    """Rewrite a per-expert checkpoint in the fused layout (gate_up_proj [E,2p,d], down_proj [E,d,p])."""
    from safetensors.torch import load_file, save_file
    sd = load_file(str(out / "model.safetensors"))
    layers = sorted({k.split(".")[2] for k in sd if ".mlp.experts." in k})
    for i in layers:
        pre = f"model.layers.{i}.mlp.experts."
        E = len({k for k in sd if k.startswith(pre) and k.endswith("gate_proj.weight")})
        sd[pre + "gate_up_proj"] = torch.stack([torch.cat([sd.pop(f"{pre}{e}.gate_proj.weight"),
                                                           sd.pop(f"{pre}{e}.up_proj.weight")]) for e in range(E)])
        sd[pre + "down_proj"] = torch.stack([sd.pop(f"{pre}{e}.down_proj.weight") for e in range(E)])
    save_file(sd, str(out / "model.safetensors"))


@pytest.mark.parametrize("make", [_qwen, _deepseek])
def test_fused_expert_layout(tmp_path, make):
    model, out = _build(make(tmp_path), tmp_path, seed=3)
    _fuse(out)
    _check(model, out)


# ---- the other families: transformers' own save_pretrained output, and the tiny factory's ----------

_TINY = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, tie_word_embeddings=False)
FAMILY_CONFIGS = {
    "mixtral": lambda: transformers.MixtralConfig(**_TINY, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2),
    "qwen2_moe": lambda: transformers.Qwen2MoeConfig(
        **_TINY, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[1]),
    "olmoe": lambda: transformers.OlmoeConfig(**_TINY, intermediate_size=32, num_experts=8, num_experts_per_tok=2,
                                              clip_qkv=0.5),
    "deepseek_v2": lambda: transformers.DeepseekV2Config(
        **{**_TINY, "num_key_value_heads": 4, "max_position_embeddings": 40 * 32}, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=1.5, q_lora_rank=None,
        kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 32,
                         "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}),
    "glm4_moe": lambda: transformers.Glm4MoeConfig(
        **_TINY, head_dim=16, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, first_k_dense_replace=1, n_group=2, topk_group=1, routed_scaling_factor=2.0,
        use_qk_norm=True, attention_bias=True),
    "ernie4_5_moe": lambda: transformers.Ernie4_5_MoeConfig(
        **{**_TINY, "tie_word_embeddings": True}, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        moe_num_experts=8, moe_k=2, moe_num_shared_experts=1, moe_layer_start_index=1),
    "minimax_m2": lambda: transformers.MiniMaxM2Config(
        **_TINY, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, rotary_dim=8),
    "gpt_oss": lambda: transformers.GptOssConfig(  # sliding window 4 < the test's 10 tokens, so it matters
        **_TINY, head_dim=16, intermediate_size=32, num_local_experts=8, num_experts_per_tok=2, sliding_window=4,
        swiglu_limit=0.05),  # a limit the tiny activations reach, so the clamps matter
    "llama4": lambda: transformers.Llama4TextConfig(  # NoPE layer 1, chunks of 4, temperature from position 2 on
        **_TINY, head_dim=16, intermediate_size=32, intermediate_size_mlp=96, num_local_experts=8, num_experts_per_tok=2,
        interleave_moe_layer_step=2, no_rope_layer_interval=2, attention_chunk_size=4, floor_scale=2, attn_scale=0.5,
        rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                         "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
}


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_family_matches_transformers(tmp_path, family):
    model, out = _build(FAMILY_CONFIGS[family](), tmp_path, seed=4)
    _check(model, out)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_factory_checkpoint_loads_in_transformers_and_matches(tmp_path, family):
    from mobe_stream.synth import make_tiny_moe

    src = make_tiny_moe(tmp_path / "m", family, dtype=torch.float32, num_shards=2)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _check(model.eval(), src)


@pytest.mark.parametrize("family", sorted(FAMILY_CONFIGS))
def test_save_pretrained_checkpoint_compresses_and_exports(tmp_path, family):
    """What transformers' own save_pretrained writes (not only the factory's layout): compress, verify,
    export; transformers loads the export with no missing or unexpected keys, and its logits equal
    our runner's on the compact form."""
    from mobe_stream.pipeline.compress import compress
    from mobe_stream.pipeline.export import ExportOptions, export
    from mobe_stream.pipeline.options import CompressOptions
    from mobe_stream.verify import verify

    _, src = _build(FAMILY_CONFIGS[family](), tmp_path, seed=6)
    mobe, out = tmp_path / "mobe", tmp_path / "exported"
    compress(src, mobe, CompressOptions(method="mobe", num_bases=4, rank=16, steps=3, checkpoint_every=1e9, dtype="fp32"))
    assert verify(mobe) == []
    export(mobe, out, ExportOptions())
    assert verify(out) == []
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ours = load_model(mobe, dtype=torch.float32)
    try:
        _close(ours(torch.tensor([SEQS[0]]))[0], _ref_logits(model.eval(), SEQS[0]))
    finally:
        ours.close()


def test_llama4_multimodal_as_released(tmp_path):
    """Llama-4 as Meta releases it (Llama4ForConditionalGeneration, text model under `language_model.`):
    the factory's checkpoint loads in transformers with no missing or unexpected keys, and our runner's
    text logits equal transformers' on both the factory's and transformers' own save_pretrained files."""
    from mobe_stream.synth import make_tiny_moe

    src = make_tiny_moe(tmp_path / "m", "llama4", multimodal=True, dtype=torch.float32, num_shards=2)
    model, info = transformers.Llama4ForConditionalGeneration.from_pretrained(src, output_loading_info=True,
                                                                               dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _check(model.eval(), src)
    text = FAMILY_CONFIGS["llama4"]().to_dict()
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1, "num_attention_heads": 2,
              "image_size": 28, "patch_size": 14, "vision_output_dim": 32, "projector_input_dim": 32,
              "projector_output_dim": 32}
    torch.manual_seed(5)
    model = transformers.Llama4ForConditionalGeneration(transformers.Llama4Config(text_config=text, vision_config=vision))
    model.eval().save_pretrained(tmp_path / "hf")
    _check(model, tmp_path / "hf")


def test_gpt_oss_mxfp4_experts_as_released(tmp_path):
    """gpt-oss's release format: experts as MXFP4 `_blocks`/`_scales` (dequantized on read); transformers
    loads the same files (dequantizing them too) and computes our logits; disk offload reads them too."""
    from mobe_stream.synth import make_tiny_moe

    src = make_tiny_moe(tmp_path / "m", "gpt_oss", mxfp4=True, dtype=torch.float32, num_shards=2)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(src, output_loading_info=True, dtype=torch.float32)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    _check(model.eval(), src)
    _check(model, src, device_map={"": "disk"})
