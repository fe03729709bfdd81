"""The synthetic checkpoint factory: hub names, shards, FP8, structure, tokenizer, and real transformers loading."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from mobe_stream.synth import make_tiny_moe

FAMILIES = ("qwen3_moe", "deepseek_v3", "kimi_k2")  # the others: test_runtime_oracle, test_family_roundtrip

EXPERT = re.compile(r"model\.layers\.\d+\.mlp\.experts\.(\d+\.(gate|up|down)_proj\.weight|gate_up_proj|down_proj)(_scale_inv)?$")


def _tensors(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(d.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                assert k not in out, f"duplicate {k}"
                out[k] = h.get_tensor(k)
    return out


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_layout_shards_and_index(tmp_path, family, layout):
    d = make_tiny_moe(tmp_path / "m", family, layout=layout, mtp_layer=family != "qwen3_moe")
    shards = sorted(p.name for p in d.glob("*.safetensors"))
    assert len(shards) >= 3
    if family == "kimi_k2":
        assert all(re.fullmatch(r"model-\d+-of-\d+\.safetensors", s) for s in shards) and "model-1-of-3.safetensors" in shards
    idx = json.loads((d / "model.safetensors.index.json").read_text())
    t = _tensors(d)
    assert set(idx["weight_map"]) == set(t) and set(idx["weight_map"].values()) == set(shards)
    assert idx["metadata"]["total_size"] > 0
    cfg = json.loads((d / "config.json").read_text())
    L = cfg["num_hidden_layers"]
    names = set(t)
    assert {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"} <= names
    experts = [n for n in names if ".mlp.experts." in n]
    assert experts and all(EXPERT.match(n) for n in experts)
    if layout == "fused":
        E, p, dm = cfg.get("num_experts") or cfg["n_routed_experts"], cfg["moe_intermediate_size"], cfg["hidden_size"]
        assert t["model.layers.1.mlp.experts.gate_up_proj"].shape == (E, 2 * p, dm)
        assert t["model.layers.1.mlp.experts.down_proj"].shape == (E, dm, p)
    if family == "qwen3_moe":
        for k in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                  "norm_topk_prob", "head_dim", "num_key_value_heads", "rope_theta"):
            assert k in cfg
        assert "model.layers.0.self_attn.q_norm.weight" in names and "model.layers.0.mlp.gate_proj.weight" in names
    else:
        for k in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "moe_layer_freq", "n_group", "topk_group",
                  "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                  "v_head_dim", "scoring_func", "topk_method", "norm_topk_prob"):
            assert k in cfg
        assert set(cfg["rope_scaling"]) >= {"type", "factor", "original_max_position_embeddings", "beta_fast", "beta_slow",
                                            "mscale", "mscale_all_dim"}
        assert t["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == torch.float32
        for m in ("q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
            assert f"model.layers.0.self_attn.{m}.weight" in names
        assert "model.layers.1.mlp.shared_experts.down_proj.weight" in names
        for m in ("embed_tokens", "enorm", "hnorm", "eh_proj", "shared_head.head", "shared_head.norm"):
            assert f"model.layers.{L}.{m}.weight" in names  # MTP layer past num_hidden_layers
    if family == "kimi_k2":
        assert cfg["model_type"] == "kimi_k2" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
        assert (cfg["n_group"], cfg["topk_group"], cfg["first_k_dense_replace"], cfg["routed_scaling_factor"]) == (1, 1, 1, 2.827)
        assert "model.layers.0.self_attn.rotary_emb.inv_freq" in names


@pytest.mark.parametrize("family", ["deepseek_v3", "kimi_k2"])
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_fp8(tmp_path, family, layout):
    d = make_tiny_moe(tmp_path / "m", family, fp8=True, layout=layout)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                          "weight_block_size": [128, 128]}
    assert cfg["hidden_size"] % 128 or cfg["moe_intermediate_size"] % 128  # partial edge blocks exist
    t = _tensors(d)
    fp8_names = [n for n, x in t.items() if x.dtype == torch.float8_e4m3fn]
    for n in fp8_names:
        s = t[n + "_scale_inv"]
        assert s.dtype == torch.float32
        *lead, m, k = t[n].shape
        assert tuple(s.shape) == (*lead, -(-m // 128), -(-k // 128))
    must = ["model.layers.0.self_attn.q_a_proj.weight", "model.layers.0.mlp.gate_proj.weight",
            "model.layers.1.mlp.shared_experts.up_proj.weight",
            "model.layers.1.mlp.experts.gate_up_proj" if layout == "fused" else "model.layers.1.mlp.experts.0.gate_proj.weight"]
    assert set(must) <= set(fp8_names)
    for n in ("model.embed_tokens.weight", "lm_head.weight", "model.norm.weight", "model.layers.1.mlp.gate.weight",
              "model.layers.0.input_layernorm.weight"):
        assert t[n].dtype == torch.bfloat16


def _load(d: Path, kimi: bool = False):
    transformers = pytest.importorskip("transformers")
    if kimi:  # transformers does not know model_type kimi_k2: use the DeepSeek-V3 classes and key conversions
        cfg = transformers.DeepseekV3Config.from_pretrained(d)
        cfg.model_type = "deepseek_v3"
    else:
        cfg = transformers.AutoConfig.from_pretrained(d)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(d, config=cfg, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_transformers_loads(tmp_path, family, layout):
    d = make_tiny_moe(tmp_path / "m", family, layout=layout, dtype=torch.float32)
    model = _load(d, kimi=family == "kimi_k2")
    t = _tensors(d)
    sd = model.state_dict()
    gu = sd["model.layers.1.mlp.experts.gate_up_proj"]
    if layout == "per_expert":  # transformers fuses gate rows first
        want = torch.cat([t["model.layers.1.mlp.experts.3.gate_proj.weight"], t["model.layers.1.mlp.experts.3.up_proj.weight"]])
        assert torch.equal(gu[3], want)
        assert torch.equal(sd["model.layers.1.mlp.experts.down_proj"][3], t["model.layers.1.mlp.experts.3.down_proj.weight"])
    else:
        assert torch.equal(gu, t["model.layers.1.mlp.experts.gate_up_proj"])
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 9, 2]])).logits
    assert logits.shape[-1] == model.config.vocab_size and torch.isfinite(logits).all()


def _rel_err_shared_rank(W: torch.Tensor, k: int) -> float:
    """Error of the best approximation of every expert as a mix of k shared basis matrices (rank k over experts)."""
    S = torch.linalg.svdvals(W.reshape(W.shape[0], -1).double())
    return float((S[k:].square().sum() / S.square().sum()).sqrt())


def test_structured_experts_share_structure(tmp_path):
    errs = {}
    for structured in (True, False):
        d = make_tiny_moe(tmp_path / str(structured), "qwen3_moe", structured=structured, dtype=torch.float32)
        t = _tensors(d)
        W = torch.stack([t[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] for e in range(8)])
        assert 0.01 < float(W.std()) < 0.04
        errs[structured] = _rel_err_shared_rank(W, 4)  # 4 = clusters
    assert errs[True] < 0.8 * errs[False], errs


def test_tokenizer_round_trip(tmp_path):
    from tokenizers import Tokenizer

    d = make_tiny_moe(tmp_path / "m", "deepseek_v3")
    cfg = json.loads((d / "config.json").read_text())
    tok = Tokenizer.from_file(str(d / "tokenizer.json"))
    assert tok.get_vocab_size() <= cfg["vocab_size"]
    text = "The experts of a layer look alike. Zebra 42!"
    ids = tok.encode(text).ids
    assert tok.decode(ids) == text
    tc = json.loads((d / "tokenizer_config.json").read_text())
    assert tok.token_to_id(tc["bos_token"]) == cfg["bos_token_id"] and tok.token_to_id(tc["eos_token"]) == cfg["eos_token_id"]


def test_deterministic(tmp_path):
    a = _tensors(make_tiny_moe(tmp_path / "a", "kimi_k2", seed=3))
    b = _tensors(make_tiny_moe(tmp_path / "b", "kimi_k2", seed=3))
    c = _tensors(make_tiny_moe(tmp_path / "c", "kimi_k2", seed=4))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["model.layers.1.mlp.experts.0.up_proj.weight"], c["model.layers.1.mlp.experts.0.up_proj.weight"])


def test_cli(tmp_path):
    import subprocess
    import sys

    root = Path(__file__).resolve().parent.parent
    out = tmp_path / "cli"
    subprocess.run([sys.executable, str(root / "tools" / "make_tiny_moe.py"), str(out), "--family", "deepseek_v3", "--fp8",
                    "--layout", "fused", "--num-layers", "2"], check=True, cwd=tmp_path)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
