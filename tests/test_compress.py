"""End-to-end compress: every family and storage form, bit-exact copy-through, format, refusals."""

from __future__ import annotations

import json

import pytest
import torch

from mobe_stream import defaults
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.errors import ConfigError, MobeError
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.synth import make_tiny_moe

from .helpers import all_tensors, dir_digest, run_cli

FAST = dict(num_bases=4, rank=16, steps=20, checkpoint_every=1e9)

CASES = [
    ("qwen3_moe", dict()),
    ("qwen3_moe", dict(layout="fused")),
    ("deepseek_v3", dict()),
    ("deepseek_v3", dict(fp8=True)),
    ("kimi_k2", dict(fp8=True)),
    ("qwen3_moe", dict(dtype=torch.float32)),
]


@pytest.mark.parametrize("family,kw", CASES, ids=[f"{f}-{'-'.join(map(str, k.values())) or 'bf16'}" for f, k in CASES])
def test_compress_families(tmp_path, family, kw):
    src = make_tiny_moe(tmp_path / "src", family=family, **kw)
    before = dir_digest(src)
    out = tmp_path / "out"
    summary = compress(src, out, CompressOptions(**FAST))
    assert dir_digest(src) == before, "source dir was modified"

    cfg = json.loads((out / "config.json").read_text())
    mobe = cfg["mobe"]
    assert mobe["format_version"] == 1 and mobe["num_bases"] == 4 and mobe["rank"] == 16
    src_cfg = json.loads((src / "config.json").read_text())
    from mobe_stream.checkpoint.mobe_format import source_config

    assert {k: v for k, v in source_config(cfg).items() if k != "mobe"} == src_cfg  # only model_type/arch/auto_map
    assert cfg["model_type"] == "mobe_" + src_cfg["model_type"] and cfg["auto_map"]

    src_t, out_t = all_tensors(src), all_tensors(out)
    with CheckpointReader(src) as r:
        from mobe_stream.checkpoint.families import get_family

        fam = get_family(r.config, r)
        E, p, d = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
        compressed = {n for layer in mobe["layers"] for proj in ("gate_proj", "up_proj")
                      for n in fam.expert_tensor_names(layer, proj)}
    assert mobe["layers"] == fam.moe_layers() and mobe["layers"]
    # everything else copied bit-exact, same dtype
    for name, t in src_t.items():
        if name in compressed:
            assert name not in out_t
            continue
        assert out_t[name].dtype == t.dtype and torch.equal(out_t[name].view(torch.uint8), t.view(torch.uint8)), name
    # the MoBE tensors, per FORMAT.md
    factor_dtype = torch.float8_e4m3fn if kw.get("fp8") else kw.get("dtype", torch.bfloat16)
    for layer in mobe["layers"]:
        for proj in ("gate_proj", "up_proj"):
            pre = f"model.layers.{layer}.mlp.experts.{proj}."
            # --dtype auto: the factors take the source experts' storage dtype (FP8 with block scales)
            assert out_t[pre + "mobe_A"].shape == (E, p, 16) and out_t[pre + "mobe_A"].dtype == factor_dtype
            assert out_t[pre + "mobe_B"].shape == (1, 4, 16, d)
            assert out_t[pre + "mobe_alpha"].shape == (E, 4) and out_t[pre + "mobe_alpha"].dtype == torch.float32
            assert 0 < mobe["errors"][str(layer)][proj] < 1.0
    suffixes = ["mobe_A", "mobe_B", "mobe_alpha"] + (["mobe_A_scale_inv", "mobe_B_scale_inv"] if kw.get("fp8") else [])
    assert set(out_t) == (set(src_t) - compressed) | {
        f"model.layers.{n}.mlp.experts.{p}.{x}" for n in mobe["layers"] for p in ("gate_proj", "up_proj") for x in suffixes}
    # index + manifest + side files
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(out_t)
    manifest = json.loads((out / "manifest.json").read_text())
    assert set(manifest["shards"]) == set(index["weight_map"].values())
    assert (out / "tokenizer.json").read_bytes() == (src / "tokenizer.json").read_bytes()
    assert not list(out.glob("*.tmp-*")) and not (out / ".mobe-stream.lock").exists()
    assert summary["expert_reduction"] > 0


def test_reconstruction_matches_reported_error(tmp_path):
    """The stored tensors reproduce the experts with the relative error written in config.json."""
    from mobe_stream.factorize import MoBEFactors

    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe", dtype=torch.float32)
    out = tmp_path / "out"
    compress(src, out, CompressOptions(**{**FAST, "dtype": "fp32"}))
    cfg = json.loads((out / "config.json").read_text())
    layer = cfg["mobe"]["layers"][0]
    assert cfg["mobe"]["method"] == "mobe" and cfg["mobe"]["init"] == defaults.INIT
    assert cfg["mobe"]["solver"] == defaults.SOLVER
    with CheckpointReader(src) as rs, CheckpointReader(out) as ro:
        from mobe_stream.checkpoint.families import get_family

        fam = get_family(rs.config, rs)
        W = fam.expert_stack(rs, layer, "gate_proj", torch.float32)
        pre = f"model.layers.{layer}.mlp.experts.gate_proj."
        f = MoBEFactors(A=ro.get(pre + "mobe_A"), B=ro.get(pre + "mobe_B"), alpha=ro.get(pre + "mobe_alpha"), scale=1.0)
        diff = W - f.reconstruct(activation=cfg["mobe"]["activation"]) if _takes_act(f) else W - f.reconstruct()
        rel = (torch.linalg.norm(diff) / torch.linalg.norm(W)).item()
    assert rel == pytest.approx(cfg["mobe"]["errors"][str(layer)]["gate_proj"], rel=1e-3)


def _takes_act(f) -> bool:
    import inspect

    return "activation" in inspect.signature(f.reconstruct).parameters


def test_refuses_nonempty_output_and_changed_settings(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ConfigError, match="not empty"):
        compress(src, out, CompressOptions(**FAST))
    assert (out / "notes.txt").read_text() == "mine"
    (out / "notes.txt").unlink()
    compress(src, out, CompressOptions(**FAST))
    with pytest.raises(ConfigError, match="--resume"):
        compress(src, out, CompressOptions(**FAST))
    with pytest.raises(ConfigError, match="steps: was 20, now 30"):
        compress(src, out, CompressOptions(**{**FAST, "steps": 30}, resume=True))
    # a finished run resumed with the same settings is a no-op that keeps the output
    before = dir_digest(out)
    compress(src, out, CompressOptions(**FAST, resume=True))
    assert {k: v for k, v in dir_digest(out).items() if k != "mobe-journal.json"} == \
           {k: v for k, v in before.items() if k != "mobe-journal.json"}
    compress(src, out, CompressOptions(**{**FAST, "steps": 5}, overwrite=True))
    assert json.loads((out / "config.json").read_text())["mobe"]["steps"] == 5


def test_refuses_changed_source(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    compress(src, out, CompressOptions(**FAST, layers="1"))
    src2 = make_tiny_moe(tmp_path / "src", family="qwen3_moe", seed=1)  # rewrite the source in place
    with pytest.raises(ConfigError, match="source checkpoint changed"):
        compress(src2, out, CompressOptions(**FAST, layers="1", resume=True))


def test_output_inside_source_refused(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    with pytest.raises(ConfigError, match="must not be"):
        compress(src, src / "out", CompressOptions(**FAST))
    with pytest.raises(ConfigError, match="must not be"):
        compress(src, src, CompressOptions(**FAST))


def test_layers_option_and_bad_values(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="deepseek_v3")
    with CheckpointReader(src) as r:
        from mobe_stream.checkpoint.families import get_family

        moe = get_family(r.config, r).moe_layers()
    out = tmp_path / "out"
    compress(src, out, CompressOptions(**FAST, layers=str(moe[-1])))
    assert json.loads((out / "config.json").read_text())["mobe"]["layers"] == [moe[-1]]
    for bad in (dict(layers="0"), dict(groups=3), dict(activation="relu"), dict(dtype="int8")):
        with pytest.raises(MobeError):
            compress(src, tmp_path / "bad", CompressOptions(**{**FAST, **bad}))


def test_cli_compress_inspect_and_errors(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="kimi_k2", fp8=True)
    proc = run_cli("inspect", str(src), "--json", check=True)
    info = json.loads(proc.stdout)
    assert info["family"] == "kimi_k2" and info["projection"]["expert_reduction"] >= 0.25
    out = tmp_path / "out"
    log = tmp_path / "log.jsonl"
    run_cli("compress", str(src), "--out", str(out), "--steps", "10", "--quiet", "--log-json", str(log), check=True)
    events = [json.loads(line)["event"] for line in log.read_text().splitlines()]
    assert events[:2] == ["estimate", "plan"] and events[-2:] == ["summary", "status"] and "unit_done" in events
    again = run_cli("compress", str(src), "--out", str(out), "--steps", "10", "--quiet")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and str(out) in again.stderr
    missing = run_cli("compress", str(tmp_path / "nope"), "--out", str(tmp_path / "o2"))
    assert missing.returncode == 2 and "nope" in missing.stderr and "Traceback" not in missing.stderr
