"""A compact output in transformers: a plain from_pretrained refuses it (never random experts), with
trust_remote_code=True the modeling file written next to it loads it and its logits match our
runner's; the output carries a model card and keeps the source's card and license under SOURCE_*."""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mobe_stream.checkpoint.mobe_format import source_config  # noqa: E402
from mobe_stream.runtime.model import load_model  # noqa: E402
from mobe_stream.synth import make_tiny_moe  # noqa: E402
from tests.helpers import run_cli  # noqa: E402

IDS = [[5, 17, 3, 99, 42, 7, 61, 8, 250, 11]]


def _compress(tmp_path, family: str, layout: str, *extra: str):
    src = make_tiny_moe(tmp_path / "src", family, layout=layout, dtype=torch.float32, num_shards=1)
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the source's card\n")
    (src / "LICENSE").write_text("source license text\n")
    out = tmp_path / "out"
    proc = run_cli("compress", str(src), "--out", str(out), "--steps", "3", "--num-bases", "2", "--groups", "1", *extra)
    assert proc.returncode == 0, proc.stderr
    return src, out


@pytest.mark.parametrize("family,layout", [("qwen3_moe", "per_expert"), ("deepseek_v3", "fused"),
                                           ("kimi_k2", "per_expert")])
def test_transformers_loads_the_compact_form_with_remote_code_only(tmp_path, family, layout):
    src, out = _compress(tmp_path, family, layout, "--layers", "1" if family == "qwen3_moe" else "1-2")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model_type"].startswith("mobe_") and "auto_map" in cfg
    assert source_config(cfg)["model_type"] == json.loads((src / "config.json").read_text())["model_type"]
    with pytest.raises(ValueError, match="trust_remote_code"):
        transformers.AutoModelForCausalLM.from_pretrained(out)
    model, info = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                                    output_loading_info=True)
    assert not info["missing_keys"] and not [k for k in info["unexpected_keys"] if "rotary_emb" not in k], info
    with torch.no_grad():
        theirs = model(torch.tensor(IDS)).logits[0].float()
    ours_model = load_model(out, dtype=torch.float32, mobe_cache=0)
    ours = ours_model(torch.tensor(IDS))[0]
    ours_model.close()
    assert (theirs - ours).abs().max() / ours.abs().max() < 1e-4
    loaded = {n for n, _ in model.named_parameters()}
    assert any("mobe_A" in n for n in loaded) and not any("gate_up_proj" in n for n in loaded if ".layers.1." in n)


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_remote_code_runs_offloaded_through_accelerate(tmp_path, layout):
    pytest.importorskip("accelerate")
    _, out = _compress(tmp_path, "deepseek_v3", layout)
    full = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32)
    budget = sum(p.numel() * 4 for p in full.parameters()) // 3  # a third of the model in RAM, the rest on disk
    model = transformers.AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, dtype=torch.float32,
                                                              device_map="auto", max_memory={"cpu": budget},
                                                              offload_folder=str(tmp_path / "offload"))
    assert "disk" in set(model.hf_device_map.values())
    with torch.no_grad():
        want = full(torch.tensor(IDS)).logits
        got = model(torch.tensor(IDS)).logits
    assert (got - want).abs().max() / want.abs().max() < 1e-5


def test_compact_output_has_a_card_and_keeps_the_sources_under_source_names(tmp_path):
    src, out = _compress(tmp_path, "qwen3_moe", "per_expert")
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model:") and "library_name: transformers" in card and "- mobe" in card
    assert "trust_remote_code=True" in card and "mobe-stream export" in card and "| 1 |" in card
    assert (out / "SOURCE_README.md").read_text() == (src / "README.md").read_text()
    assert (out / "SOURCE_LICENSE").read_text() == "source license text\n"
    assert (out / "modeling_mobe.py").is_file()
    exp = tmp_path / "exp"
    proc = run_cli("export", str(out), "--out", str(exp))
    assert proc.returncode == 0, proc.stderr
    cfg = json.loads((exp / "config.json").read_text())
    assert cfg["model_type"] == "qwen3_moe" and "auto_map" not in cfg and not (exp / "modeling_mobe.py").exists()
    assert (exp / "SOURCE_LICENSE").exists() and not (exp / "README.md").exists()
    model = transformers.AutoModelForCausalLM.from_pretrained(exp, dtype=torch.float32)  # the standard class again
    assert type(model).__name__ == "Qwen3MoeForCausalLM"
    proc = run_cli("verify", str(out))
    assert proc.returncode == 0, proc.stdout + proc.stderr
