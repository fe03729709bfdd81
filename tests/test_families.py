"""Family table: detection, MoE layer rules per config spelling, both expert layouts, FP8."""

from __future__ import annotations

import pytest
import torch

from mobe_stream.checkpoint import families, fp8
from mobe_stream.checkpoint.families import get_family
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.errors import CheckpointError

E, P, D = 4, 12, 8  # experts, moe_intermediate_size, hidden_size


def _cfg(model_type: str | None, **kw) -> dict:
    cfg = {"hidden_size": D, "moe_intermediate_size": P, "num_hidden_layers": 4, "num_experts_per_tok": 2}
    if model_type:
        cfg["model_type"] = model_type
    cfg.update(kw)
    return cfg


@pytest.mark.parametrize("cfg,expected", [
    (_cfg("deepseek_v3", n_routed_experts=E, first_k_dense_replace=1, num_hidden_layers=6), [1, 2, 3, 4, 5]),
    (_cfg("deepseek_v3", n_routed_experts=E, first_k_dense_replace=1, moe_layer_freq=2, num_hidden_layers=6), [2, 4]),
    (_cfg("deepseek_v3", num_local_experts=E, first_k_dense_replace=0), [0, 1, 2, 3]),
    (_cfg("deepseek_v3", n_routed_experts=E), [3]),  # transformers default first_k_dense_replace=3
    (_cfg("kimi_k2", n_routed_experts=E, first_k_dense_replace=1), [1, 2, 3]),
    (_cfg("qwen3_moe", num_experts=E), [0, 1, 2, 3]),
    (_cfg("qwen3_moe", num_local_experts=E, mlp_only_layers=[0, 2]), [1, 3]),
    (_cfg("qwen3_moe", num_experts=E, decoder_sparse_step=2), [1, 3]),
    (_cfg("qwen3_moe", num_experts=0), []),
    (_cfg(None, architectures=["Qwen3MoeForCausalLM"], num_experts=E), [0, 1, 2, 3]),
    (_cfg(None, architectures=["DeepseekV3ForCausalLM"], n_routed_experts=E, first_k_dense_replace=2), [2, 3]),
    (_cfg("mixtral", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P), [0, 1, 2, 3]),
    (_cfg("qwen2_moe", num_experts=E, mlp_only_layers=[3]), [0, 1, 2]),
    (_cfg("olmoe", num_experts=E, moe_intermediate_size=None, intermediate_size=P), [0, 1, 2, 3]),
    (_cfg("deepseek_v2", n_routed_experts=E), [0, 1, 2, 3]),  # transformers' DeepseekV2Config: first_k_dense_replace 0
    (_cfg("glm4_moe", n_routed_experts=E), [1, 2, 3]),  # Glm4MoeConfig: first_k_dense_replace 1
    (_cfg("ernie4_5_moe", moe_num_experts=E, moe_k=2, num_experts_per_tok=None), [1, 2, 3]),
    (_cfg("ernie4_5_moe", moe_num_experts=E, moe_layer_start_index=0, moe_layer_end_index=2, moe_layer_interval=2),
     [1]),
    (_cfg("minimax_m2", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P), [0, 1, 2, 3]),
    (_cfg("gpt_oss", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P), [0, 1, 2, 3]),
    (_cfg("llama4_text", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P), [0, 1, 2, 3]),
    (_cfg("llama4_text", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P,
          interleave_moe_layer_step=2), [1, 3]),  # Maverick
    (_cfg("llama4_text", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P, moe_layers=[0, 3]),
     [0, 3]),
])
def test_moe_layers(cfg, expected):
    fam = get_family(cfg)
    assert fam.moe_layers() == expected
    assert fam.num_experts == (cfg.get("n_routed_experts") or cfg.get("num_experts") or cfg.get("num_local_experts")
                               or cfg.get("moe_num_experts") or 0)
    assert (fam.hidden_size, fam.moe_intermediate_size, fam.top_k) == (D, P, 2)


def test_family_names():
    assert get_family(_cfg("kimi_k2", architectures=["DeepseekV3ForCausalLM"], n_routed_experts=E)).name == "kimi_k2"
    assert get_family(_cfg("deepseek_v3", n_routed_experts=E)).name == "deepseek_v3"
    assert get_family(_cfg(None, architectures=["DeepseekV3ForCausalLM"], n_routed_experts=E)).name == "deepseek_v3"
    assert get_family(_cfg("qwen3_moe", num_experts=E)).name == "qwen3_moe"
    assert families.SUPPORTED == ("deepseek_v2", "deepseek_v3", "ernie4_5_moe", "glm4_moe", "gpt_oss", "kimi_k2",
                                  "llama4", "minimax_m2", "mixtral", "olmoe", "qwen2_moe", "qwen3_moe")
    assert get_family(_cfg(None, architectures=["Llama4ForCausalLM"], num_local_experts=E, intermediate_size=P)).name == "llama4"


def test_unknown_family_names_config(make_ckpt):
    d = make_ckpt({"x": torch.zeros(1)}, {"model_type": "dbrx", "architectures": ["DbrxForCausalLM"]})
    with CheckpointReader(d) as r, pytest.raises(CheckpointError) as ei:
        get_family(r.config, r)
    msg = str(ei.value)
    assert "unsupported model family 'dbrx'" in msg and f"supported: {families.SUPPORTED[0]} (" in msg
    assert all(f"; {name} (" in msg for name in families.SUPPORTED[1:])  # every family, with its published models
    assert str(d / "config.json") in msg


def test_multimodal_llama4_is_read_as_its_text_model(make_ckpt):
    text = _cfg("llama4_text", num_local_experts=E, moe_intermediate_size=None, intermediate_size=P, moe_layers=[1, 3])
    cfg = {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"], "torch_dtype": "bfloat16",
           "text_config": {k: v for k, v in text.items() if k != "architectures"}, "vision_config": {"hidden_size": 8}}
    view, prefix = families.text_view(cfg)
    assert prefix == "language_model." and view["model_type"] == "llama4_text" and view["torch_dtype"] == "bfloat16"
    fam = get_family(cfg)
    assert fam.name == "llama4" and fam.moe_layers() == [1, 3]
    assert fam.router_weight_name(1) == "language_model.model.layers.1.feed_forward.router.weight"
    assert families.layer_of("language_model.model.layers.3.self_attn.q_proj.weight") == 3
    assert families.layer_of("vision_model.model.layers.0.mlp.fc1.weight") is None  # the vision tower is no decoder layer
    d = make_ckpt({"x": torch.zeros(1)}, {"model_type": "llama4", "architectures": ["Llama4ForConditionalGeneration"]})
    with CheckpointReader(d) as r, pytest.raises(CheckpointError) as ei:
        get_family(r.config, r)
    assert "llama4 config has no valid text_config" in str(ei.value) and str(d / "config.json") in str(ei.value)


def test_missing_config_key_is_checkpoint_error(make_ckpt):
    d = make_ckpt({"x": torch.zeros(1)}, {"model_type": "qwen3_moe"})
    with CheckpointReader(d) as r, pytest.raises(CheckpointError, match="has no valid num_hidden_layers"):
        get_family(r.config, r)


def test_config_spellings():
    assert families.config_dtype({"dtype": "bfloat16"}) == "bfloat16"
    assert families.config_dtype({"torch_dtype": "float16"}) == "float16"
    assert families.rope_config({"rope_parameters": {"rope_type": "yarn"}}) == {"rope_type": "yarn"}
    assert families.rope_config({"rope_scaling": {"type": "yarn", "factor": 40}})["factor"] == 40
    assert families.num_experts({"num_local_experts": 7}) == 7


# ---- layouts -----------------------------------------------------------------------------------

def _experts(seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {p: torch.randn(E, D if p == "down_proj" else P, D if p != "down_proj" else P, generator=g)
            for p in ("gate_proj", "up_proj", "down_proj")}


def _layer_tensors(layer: int, W: dict, layout: str, dtype=torch.bfloat16, fp8_on=False) -> dict:
    """MoE layer tensors in the requested storage layout (per-expert hub names or fused 3-D)."""
    pre = f"model.layers.{layer}.mlp."
    out = {pre + "gate.weight": torch.randn(E, D).to(torch.bfloat16)}

    def put(name, w):  # w: [out, in] or [E, out, in]
        if not fp8_on:
            out[name] = w.to(dtype)
            return
        if w.dim() == 2:
            q, s = fp8.quantize(w)
        else:
            qs = [fp8.quantize(x) for x in w]
            q, s = torch.stack([a for a, _ in qs]), torch.stack([b for _, b in qs])
        out[name], out[fp8.scale_name(name)] = q, s

    if layout == "per_expert":
        for e in range(E):
            for p in ("gate_proj", "up_proj", "down_proj"):
                put(f"{pre}experts.{e}.{p}.weight", W[p][e])
    else:
        put(pre + "experts.gate_up_proj", torch.cat([W["gate_proj"], W["up_proj"]], dim=1))
        put(pre + "experts.down_proj", W["down_proj"])
    return out


@pytest.mark.parametrize("fp8_on", [False, True])
def test_both_layouts_give_same_experts(make_ckpt, fp8_on):
    W = _experts()
    dirs = {}
    for layout in ("per_expert", "fused"):
        ts = {"model.embed_tokens.weight": torch.randn(10, D).to(torch.bfloat16)}
        ts.update(_layer_tensors(1, W, layout, fp8_on=fp8_on))
        cfg = _cfg("deepseek_v3", n_routed_experts=E, first_k_dense_replace=1, num_hidden_layers=2)
        if fp8_on:
            cfg["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
        dirs[layout] = make_ckpt(ts, cfg, shards=2, name=layout)
    got = {}
    for layout, d in dirs.items():
        with CheckpointReader(d) as r:
            fam = get_family(r.config, r)
            assert fam.layout == layout and fam.moe_layers() == [1]
            for p in ("gate_proj", "up_proj", "down_proj"):
                stack = fam.expert_stack(r, 1, p, torch.float32)
                assert stack.shape == ((E, P, D) if p != "down_proj" else (E, D, P))
                assert torch.equal(stack[2], fam.expert_weight(r, 1, 2, p, torch.float32))
                got[layout, p] = stack
                names = fam.expert_tensor_names(1, p)
                assert all(n in r for n in names)
                assert any(n.endswith("_scale_inv") for n in names) == fp8_on
    for p in ("gate_proj", "up_proj", "down_proj"):
        if not fp8_on:
            assert torch.equal(got["per_expert", p], got["fused", p]), p
            assert torch.equal(got["fused", p], W[p].to(torch.bfloat16).float())
        else:  # fused gate/up share FP8 blocks, so the two layouts quantize differently
            for layout in ("per_expert", "fused"):
                assert ((got[layout, p] - W[p]).norm() / W[p].norm()).item() < 0.05


def test_expert_tensor_names_per_layout(make_ckpt):
    W = _experts()
    cfg = _cfg("qwen3_moe", num_experts=E, num_hidden_layers=1)
    with CheckpointReader(make_ckpt(_layer_tensors(0, W, "fused"), cfg, name="f")) as r:
        fam = get_family(r.config, r)
        pre = "model.layers.0.mlp.experts."
        assert fam.expert_tensor_names(0, "gate_proj") == [pre + "gate_up_proj"]
        assert fam.expert_tensor_names(0, "up_proj") == [pre + "gate_up_proj"]
        assert fam.expert_tensor_names(0, "down_proj") == [pre + "down_proj"]
        assert fam.router_names(0) == ["model.layers.0.mlp.gate.weight"]
        assert fam.shared_expert_prefix(0) is None
    with CheckpointReader(make_ckpt(_layer_tensors(0, W, "per_expert", fp8_on=True), cfg, name="p")) as r:
        fam = get_family(r.config, r)
        names = fam.expert_tensor_names(0, "up_proj")
        assert len(names) == 2 * E and names[:2] == [
            "model.layers.0.mlp.experts.0.up_proj.weight", "model.layers.0.mlp.experts.0.up_proj.weight_scale_inv"]
        assert set(fam.layer_tensor_names(r, 0)) == set(r.names())
    with pytest.raises(ValueError, match="unknown projection"):
        fam.expert_tensor_names(0, "o_proj")


def test_deepseek_mtp_layer_not_moe_and_router_names(make_ckpt):
    W = _experts()
    ts = {}
    for layer in (1, 2):  # layer 2 is the MTP layer (index == num_hidden_layers)
        ts.update(_layer_tensors(layer, W, "per_expert"))
    ts["model.layers.1.mlp.gate.e_score_correction_bias"] = torch.zeros(E)
    cfg = _cfg("kimi_k2", architectures=["DeepseekV3ForCausalLM"], n_routed_experts=E,
               first_k_dense_replace=1, num_hidden_layers=2)
    with CheckpointReader(make_ckpt(ts, cfg)) as r:
        fam = get_family(r.config, r)
        assert fam.name == "kimi_k2" and fam.moe_layers() == [1] and not fam.is_moe_layer(2)
        assert fam.router_names(1) == ["model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.e_score_correction_bias"]
        assert fam.shared_expert_prefix(1) == "model.layers.1.mlp.shared_experts."
        assert fam.layer_prefix(1) == "model.layers.1."


def test_mixed_layouts_refused(make_ckpt):
    W = _experts()
    ts = {**_layer_tensors(0, W, "per_expert"), **_layer_tensors(1, W, "fused")}
    with CheckpointReader(make_ckpt(ts, _cfg("qwen3_moe", num_experts=E, num_hidden_layers=2))) as r:
        with pytest.raises(CheckpointError, match="mixes per-expert and fused"):
            get_family(r.config, r)


def test_fused_layout_from_down_proj_only(make_ckpt):
    """An output checkpoint (gate/up replaced by MoBE tensors) still reports its layout."""
    W = _experts()
    ts = {k: v for k, v in _layer_tensors(0, W, "fused").items() if "gate_up" not in k}
    with CheckpointReader(make_ckpt(ts, _cfg("qwen3_moe", num_experts=E, num_hidden_layers=1))) as r:
        fam = get_family(r.config, r)
        assert fam.layout == "fused"
        assert torch.equal(fam.expert_weight(r, 0, 1, "down_proj", torch.float32), W["down_proj"][1].to(torch.bfloat16).float())


def test_fused_fp8_gate_up_split_exact(make_ckpt):
    """Fused FP8: the whole [2p, d] expert is dequantized with its [sm, sn] scale, then split."""
    W = _experts(seed=2)
    ts = _layer_tensors(0, W, "fused", fp8_on=True)
    cfg = _cfg("qwen3_moe", num_experts=E, num_hidden_layers=1,
               quantization_config={"quant_method": "fp8", "weight_block_size": [128, 128]})
    name = "model.layers.0.mlp.experts.gate_up_proj"
    with CheckpointReader(make_ckpt(ts, cfg)) as r:
        fam = get_family(r.config, r)
        for e in range(E):
            full = fp8.dequantize(ts[name][e], ts[fp8.scale_name(name)][e], (128, 128), torch.bfloat16)
            assert torch.equal(fam.expert_weight(r, 0, e, "gate_proj", torch.bfloat16), full[:P])
            assert torch.equal(fam.expert_weight(r, 0, e, "up_proj", torch.bfloat16), full[P:])
        assert fam.expert_tensor_names(0, "gate_proj") == [name, name + "_scale_inv"]


def test_family_names_and_runtime_spelling():
    """Each family's stored names; the runtime's canonical spelling of them (FamilySpec.runtime_name)."""
    mix = get_family(_cfg("mixtral", num_local_experts=E, intermediate_size=P))
    assert mix.moe_intermediate_size == P  # Mixtral's expert width is intermediate_size
    assert mix.expert_name(2, 5, "up_proj") == "model.layers.2.block_sparse_moe.experts.5.w3.weight"
    assert mix.router_weight_name(2) == "model.layers.2.block_sparse_moe.gate.weight"
    rt = mix.spec.runtime_name
    assert rt("block_sparse_moe.experts.5.w1.weight") == "mlp.experts.5.gate_proj.weight"
    assert rt("block_sparse_moe.experts.5.w2.weight") == "mlp.experts.5.down_proj.weight"
    assert rt("block_sparse_moe.experts.gate_proj.mobe_A") == "mlp.experts.gate_proj.mobe_A"
    assert rt("self_attn.q_proj.weight") == "self_attn.q_proj.weight"
    qw = get_family(_cfg("qwen2_moe", num_experts=E)).spec
    assert qw.runtime_name("mlp.shared_expert.up_proj.weight") == "mlp.shared_experts.up_proj.weight"
    assert qw.runtime_name("mlp.shared_expert_gate.weight") == "mlp.shared_expert_gate.weight"
    mm = get_family(_cfg("minimax_m2", num_local_experts=E, intermediate_size=P))
    assert mm.router_names(0) == ["model.layers.0.block_sparse_moe.gate.weight",
                                  "model.layers.0.block_sparse_moe.e_score_correction_bias"]
    assert mm.spec.runtime_name("block_sparse_moe.e_score_correction_bias") == "mlp.gate.e_score_correction_bias"
    er = get_family(_cfg("ernie4_5_moe", moe_num_experts=E)).spec
    assert er.runtime_name("mlp.moe_statics.e_score_correction_bias") == "mlp.gate.e_score_correction_bias"
    go = get_family(_cfg("gpt_oss", num_local_experts=E, intermediate_size=P))
    assert go.router_names(0) == ["model.layers.0.mlp.router.weight", "model.layers.0.mlp.router.bias"]
    assert go.spec.runtime_name("mlp.router.bias") == "mlp.gate.bias"
    assert go.spec.runtime_name("mlp.experts.gate_up_proj_bias") == "mlp.experts.gate_up_proj_bias"
    assert go.form == families.FusedForm(in_first=True, interleaved=True)
    ll = get_family(_cfg("llama4_text", num_local_experts=E, intermediate_size=P))
    assert ll.router_weight_name(1) == "model.layers.1.feed_forward.router.weight"
    assert ll.fused_tensor_name(1, "up_proj") == "model.layers.1.feed_forward.experts.gate_up_proj"
    assert ll.shared_expert_prefix(1) == "model.layers.1.feed_forward.shared_expert."
    assert ll.spec.runtime_name("feed_forward.shared_expert.up_proj.weight") == "mlp.shared_experts.up_proj.weight"
    assert ll.spec.runtime_name("feed_forward.router.weight") == "mlp.gate.weight"
    assert ll.spec.runtime_name("feed_forward.gate_proj.weight") == "mlp.gate_proj.weight"  # a dense layer
    assert ll.form == families.FusedForm(in_first=True)


@pytest.mark.parametrize("form", [families.IN_MEMORY, families.FusedForm(in_first=True),
                                  families.FusedForm(in_first=True, interleaved=True)])
def test_fused_forms_split_what_join_stores(form):
    """The three fused forms (transformers in memory, Llama-4 hub halves, gpt-oss hub interleaved):
    split inverts join, shapes are the ones the form names, biases split like the columns."""
    W = _experts(seed=3)
    stored = form.join(W["gate_proj"], W["up_proj"])
    assert stored.shape == form.gate_up_shape(E, P, D)
    gate, up = form.split(stored)
    assert torch.equal(gate, W["gate_proj"]) and torch.equal(up, W["up_proj"])
    bias = torch.arange(2 * P, dtype=torch.float32)
    bg, bu = form.split_bias(bias)
    half = torch.arange(P) * (2 if form.interleaved else 1)
    assert torch.equal(bg, bias[half]) and torch.equal(bu, bias[half + (1 if form.interleaved else P)])
    down = W["down_proj"].mT.contiguous() if form.in_first else W["down_proj"]
    assert tuple(down.shape) == form.down_shape(E, P, D) and torch.equal(form.down(down), W["down_proj"])
