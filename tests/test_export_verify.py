"""export: rebuilt standard checkpoints in the source layout; verify: finds what is wrong."""

from __future__ import annotations

import json

import pytest
import torch

from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.factorize import MoBEFactors
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.export import ExportOptions, export
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.synth import make_tiny_moe
from mobe_stream.verify import verify

from .helpers import all_tensors, dir_digest, run_cli

FAST = dict(num_bases=4, rank=16, steps=10, checkpoint_every=1e9)


def _compressed(tmp_path, family="qwen3_moe", **kw):
    src = make_tiny_moe(tmp_path / "src", family=family, **kw)
    mobe = tmp_path / "mobe"
    compress(src, mobe, CompressOptions(**FAST, dtype="fp32" if kw.get("dtype") == torch.float32 else "bf16"))
    return src, mobe


def _expected_expert(mobe_dir, layer, proj, e):
    with CheckpointReader(mobe_dir) as r:
        act = r.config["mobe"]["activation"]
        pre = f"model.layers.{layer}.mlp.experts.{proj}."
        f = MoBEFactors(A=r.get(pre + "mobe_A", torch.float32), B=r.get(pre + "mobe_B", torch.float32),
                        alpha=r.get(pre + "mobe_alpha", torch.float32), scale=1.0)
        return f.reconstruct(torch.tensor([e]), activation=act)[0]


@pytest.mark.parametrize("family,kw,dtype", [
    ("qwen3_moe", {}, "auto"),
    ("qwen3_moe", {"layout": "fused"}, "bf16"),
    ("deepseek_v3", {"fp8": True}, "fp8"),
    ("kimi_k2", {"fp8": True}, "bf16"),
])
def test_export_layout_matches_source(tmp_path, family, kw, dtype):
    src, mobe = _compressed(tmp_path, family, **kw)
    before = dir_digest(mobe)
    out = tmp_path / "exported"
    export(mobe, out, ExportOptions(dtype=dtype))
    assert dir_digest(mobe) == before
    assert verify(out) == []
    src_t, out_t = all_tensors(src), all_tensors(out)
    cfg_src = json.loads((src / "config.json").read_text())
    cfg_out = json.loads((out / "config.json").read_text())
    assert "mobe" not in cfg_out
    if dtype == "fp8" or (dtype == "auto" and not kw.get("fp8")):
        assert set(out_t) == set(src_t)
        assert cfg_out.get("quantization_config") == cfg_src.get("quantization_config")
        for n, t in src_t.items():
            assert out_t[n].shape == t.shape and out_t[n].dtype == t.dtype, n
    else:  # dequantized export: no FP8 weights, no scales, config does not claim FP8
        assert set(out_t) == {n for n in src_t if not n.endswith("_scale_inv")}
        assert "quantization_config" not in cfg_out
        assert not any(t.dtype == torch.float8_e4m3fn for t in out_t.values())
    layer = json.loads((mobe / "config.json").read_text())["mobe"]["layers"][0]
    want = _expected_expert(mobe, layer, "up_proj", 3)
    with CheckpointReader(out) as r:
        from mobe_stream.checkpoint.families import get_family

        got = get_family(r.config, r).expert_weight(r, layer, 3, "up_proj", torch.float32)
    tol = 0.07 if dtype == "fp8" else 0.01
    assert torch.linalg.norm(got - want) / torch.linalg.norm(want) < tol


def test_export_refuses_fp8_for_bf16_source_and_non_mobe_input(tmp_path):
    src, mobe = _compressed(tmp_path, "qwen3_moe")
    with pytest.raises(Exception, match="fp8"):
        export(mobe, tmp_path / "x", ExportOptions(dtype="fp8"))
    proc = run_cli("export", str(src), "--out", str(tmp_path / "y"))
    assert proc.returncode == 2 and "not a MoBE checkpoint" in proc.stderr


def test_verify_reports_problems(tmp_path):
    src, mobe = _compressed(tmp_path, "deepseek_v3")
    notes: list[str] = []
    assert verify(mobe) == [] and verify(src, full=False, note=notes.append) == []  # a hub checkpoint is fine
    assert notes == [f"{src}: no manifest.json (not written by mobe-stream): shard checksums not checked"]
    ok = run_cli("verify", str(mobe))
    assert ok.returncode == 0 and "OK" in ok.stdout
    # corrupt one byte of one shard: sha256 mismatch
    shard = sorted(mobe.glob("model-*.safetensors"))[0]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 1
    shard.write_bytes(bytes(data))
    problems = verify(mobe)
    assert any("sha256" in p and shard.name in p for p in problems)
    bad = run_cli("verify", str(mobe))
    assert bad.returncode == 1 and shard.name in bad.stdout


def test_verify_catches_nan_and_bad_shapes(tmp_path):
    from safetensors.torch import load_file, save_file

    _, mobe = _compressed(tmp_path, "qwen3_moe", dtype=torch.float32)
    cfg = json.loads((mobe / "config.json").read_text())
    layer = cfg["mobe"]["layers"][0]
    index = json.loads((mobe / "model.safetensors.index.json").read_text())["weight_map"]
    name = f"model.layers.{layer}.mlp.experts.gate_proj.mobe_A"
    shard = mobe / index[name]
    tensors = load_file(shard)
    tensors[name][0, 0, 0] = float("nan")
    save_file(tensors, shard)
    assert any("NaN" in p and name in p for p in verify(mobe))
    cfg["mobe"]["rank"] += 1
    (mobe / "config.json").write_text(json.dumps(cfg))
    assert any("mobe_A" in p and "config implies" in p for p in verify(mobe, full=False))


@pytest.mark.parametrize("family,kw", [("qwen3_moe", {}), ("qwen3_moe", {"layout": "fused"}), ("deepseek_v3", {}),
                                       ("kimi_k2", {})], ids=["qwen3_moe", "qwen3_moe-fused", "deepseek_v3", "kimi_k2"])
def test_transformers_loads_export_and_matches_runner_on_mobe(tmp_path, family, kw):
    """Oracle: transformers on the exported checkpoint == our runner on the MoBE checkpoint (fp32)."""
    transformers = pytest.importorskip("transformers")
    from mobe_stream.runtime.model import load_model

    src = make_tiny_moe(tmp_path / "src", family=family, dtype=torch.float32, **kw)
    mobe = tmp_path / "mobe"
    compress(src, mobe, CompressOptions(**FAST, dtype="fp32"))
    out = tmp_path / "exported"
    export(mobe, out, ExportOptions(dtype="fp32"))
    if family == "kimi_k2":  # transformers has no kimi_k2 model type; it is DeepSeek-V3's architecture
        cfg = transformers.DeepseekV3Config.from_pretrained(out)
        cfg.model_type = "deepseek_v3"
        ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, config=cfg, dtype=torch.float32,
                                                                      output_loading_info=True)
    else:
        ref, info = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["mismatched_keys"], info
    ids = torch.tensor([[5, 17, 3, 99, 42, 7, 61, 8, 250, 11]])
    with torch.no_grad():
        want = ref.eval()(ids).logits[0].float()
    ours = load_model(mobe, dtype=torch.float32)
    try:
        got = ours(ids)[0]
    finally:
        ours.close()
    err = float((got - want).abs().max() / want.abs().max())
    assert err < 1e-4, f"relative error {err:.2e}"
