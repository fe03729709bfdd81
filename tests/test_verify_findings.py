"""verify: bad input is exit 2, a hub checkpoint is fine (with a note), unfinished runs and NaN/Inf
anywhere are findings; compress refuses NaN/Inf expert weights before writing a factorized unit."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.synth import make_tiny_moe

from .helpers import run_cli

FAST = dict(num_bases=4, rank=16, steps=5, checkpoint_every=1e9)


def _poke(model: Path, name: str, raw: bytes) -> str:
    """Overwrite the first bytes of tensor `name` in place; returns its shard's filename."""
    with CheckpointReader(model) as r:
        info = r.info(name)
    with open(model / info.shard, "r+b") as f:
        f.seek(info.offset)
        f.write(raw)
    return info.shard


def test_verify_missing_or_non_directory_is_bad_input(tmp_path):
    for path in (tmp_path / "nowhere", tmp_path / "a-file"):
        if path.name == "a-file":
            path.write_text("x")
        proc = run_cli("verify", str(path))
        assert proc.returncode == 2, proc
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and str(path) in lines[0] and "directory" in lines[0]
        assert proc.stdout == ""


def test_verify_hub_checkpoint_without_manifest_is_ok_with_a_note(tmp_path):
    src = make_tiny_moe(tmp_path / "src")
    proc = run_cli("verify", str(src))
    assert proc.returncode == 0, proc
    assert f"{src}: OK" in proc.stdout
    assert f"{src}: no manifest.json (not written by mobe-stream): shard checksums not checked" in proc.stderr


def test_verify_reports_unfinished_run(tmp_path):
    src = make_tiny_moe(tmp_path / "src")
    out = tmp_path / "mobe"
    compress(src, out, CompressOptions(**FAST))
    assert run_cli("verify", str(out), "--quick").returncode == 0
    journal = out / "mobe-journal.json"
    doc = json.loads(journal.read_text())
    journal.write_text(json.dumps({**doc, "complete": False}))
    proc = run_cli("verify", str(out), "--quick")
    assert proc.returncode == 1
    assert f"{out}: incomplete run (journal not complete): rerun compress --resume" in proc.stdout
    journal.write_text(json.dumps(doc))
    (out / ".mobe-stream.lock").write_text(json.dumps({"pid": 1, "host": "elsewhere"}))
    proc = run_cli("verify", str(out), "--quick")
    assert proc.returncode == 1 and "incomplete run" in proc.stdout and ".mobe-stream.lock" in proc.stdout


def test_verify_finds_nan_in_any_floating_tensor(tmp_path):
    src = make_tiny_moe(tmp_path / "bf16")
    nan = torch.tensor([float("nan")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes()
    shard = _poke(src, "model.embed_tokens.weight", nan)
    proc = run_cli("verify", str(src))
    assert proc.returncode == 1
    assert f"{src / shard}: tensor model.embed_tokens.weight contains NaN or Inf" in proc.stdout
    assert run_cli("verify", str(src), "--quick").returncode == 0  # the scan is the expensive part

    fp8_src = make_tiny_moe(tmp_path / "fp8", family="deepseek_v3", fp8=True)
    name = "model.layers.0.self_attn.o_proj.weight"
    with CheckpointReader(fp8_src) as r:
        assert r.info(name).dtype == "F8_E4M3"
    shard = _poke(fp8_src, name, b"\x7f")  # e4m3fn NaN
    proc = run_cli("verify", str(fp8_src))
    assert proc.returncode == 1
    assert f"{fp8_src / shard}: tensor {name} contains NaN or Inf" in proc.stdout


def test_compress_refuses_inf_expert_and_verify_reports_it(tmp_path):
    src = make_tiny_moe(tmp_path / "src")
    name = "model.layers.1.mlp.experts.2.gate_proj.weight"
    shard = _poke(src, name, torch.tensor([float("inf")], dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    out = tmp_path / "mobe"
    proc = run_cli("compress", str(src), "--out", str(out), "--num-bases", "4", "--rank", "16", "--steps", "5",
                   "--checkpoint-every", "1e9", "--quiet")
    assert proc.returncode == 2, proc
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and name in line and shard in line and "NaN or Inf" in line
    units = json.loads((out / "mobe-journal.json").read_text())["units"]
    assert "layer.1.gate_proj" not in units
    assert not (out / "manifest.json").exists()
    bad = run_cli("verify", str(src))
    assert bad.returncode == 1 and name in bad.stdout and shard in bad.stdout
