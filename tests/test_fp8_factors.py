"""FP8 sources get FP8 factors (issue 11 item 1): stored 1 byte a parameter with 128x128 block
scales, the bases stored first and A re-solved against them, read back by every consumer."""

from __future__ import annotations

import json

import pytest
import torch

from mobe_stream.checkpoint import fp8
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.factorize import MoBEFactors, MoBESpec, init_grouped_svd, refit_for_storage, relative_error
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.synth import make_tiny_moe

from .helpers import run_cli

OPTS = dict(num_bases=4, rank=32, steps=150, checkpoint_every=1e9)


@pytest.fixture(scope="module")
def fp8_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8f")
    src = make_tiny_moe(root / "src", family="deepseek_v3", structured=True, fp8=True)
    outs = {dt: root / f"out-{dt}" for dt in ("auto", "bf16")}
    for dt, out in outs.items():
        compress(src, out, CompressOptions(dtype=dt, **OPTS))
    return src, outs


def _errors(out):
    units = json.loads((out / "mobe-journal.json").read_text())["units"]
    return {k: u["info"] for k, u in units.items() if "rel_error" in u["info"]}


def test_auto_on_fp8_source_stores_fp8_factors_with_block_scales(fp8_runs):
    src, outs = fp8_runs
    out = outs["auto"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mobe"]["dtype"] == "float8_e4m3fn" and cfg["mobe"]["fp8_block"] == [128, 128]
    assert cfg["quantization_config"]["quant_method"] == "fp8"  # copied weights are still FP8
    with CheckpointReader(out) as r:
        layer = cfg["mobe"]["layers"][0]
        pre = f"model.layers.{layer}.mlp.experts.gate_proj."
        A, B = r.info(pre + "mobe_A"), r.info(pre + "mobe_B")
        assert A.dtype == "F8_E4M3" and B.dtype == "F8_E4M3" and r.info(pre + "mobe_alpha").dtype == "F32"
        E, p, rank = A.shape
        assert tuple(r.info(pre + "mobe_A_scale_inv").shape) == (E, -(-p // 128), -(-rank // 128))
        G, mg, _, d = B.shape
        assert tuple(r.info(pre + "mobe_B_scale_inv").shape) == (G, mg, -(-rank // 128), -(-d // 128))
        assert r.get(pre + "mobe_A", torch.float32).abs().sum() > 0  # dequantized on read


def test_fp8_storage_costs_under_3_percent_error(fp8_runs):
    _, outs = fp8_runs
    f8, bf = _errors(outs["auto"]), _errors(outs["bf16"])
    assert f8.keys() == bf.keys() and f8
    for key in f8:
        assert f8[key]["rel_error_fit"] == pytest.approx(bf[key]["rel_error_fit"])  # same fit
        assert f8[key]["rel_error"] <= 1.03 * bf[key]["rel_error"], (key, f8[key], bf[key])


def test_fp8_output_is_smaller_and_everything_reads_it(fp8_runs, tmp_path):
    _, outs = fp8_runs
    size = {dt: sum(f.stat().st_size for f in out.glob("model-*.safetensors")) for dt, out in outs.items()}
    assert size["auto"] < size["bf16"]
    out = outs["auto"]
    assert run_cli("verify", str(out)).returncode == 0
    proc = run_cli("export", str(out), "--out", str(tmp_path / "exp"), "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = run_cli("generate", str(out), "--prompt", "hello", "--max-new-tokens", "3", "--dtype", "fp32")
    assert proc.returncode == 0, proc.stderr


def test_auto_follows_a_bf16_source(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    compress(src, tmp_path / "out", CompressOptions(num_bases=4, rank=16, steps=2, checkpoint_every=1e9))
    assert json.loads((tmp_path / "out" / "config.json").read_text())["mobe"]["dtype"] == "bfloat16"


def test_refit_beats_rounding_the_fit():
    """Storing B first and re-solving A against it loses less than rounding both as fitted."""
    g = torch.Generator().manual_seed(0)
    W = torch.randn(16, 64, 256, generator=g) + 2 * torch.randn(1, 64, 256, generator=g)
    spec = MoBESpec(num_bases=4, rank=64)
    f = init_grouped_svd(W, spec)
    rt = lambda t: fp8.roundtrip(t)  # noqa: E731
    naive = MoBEFactors(rt(f.A), rt(f.B), f.alpha, 1.0, f.activation)
    refit = refit_for_storage(W, f, rt)
    stored = MoBEFactors(rt(refit.A), refit.B, refit.alpha, 1.0, refit.activation)
    assert torch.equal(refit.B, rt(f.B))
    assert relative_error(W, stored) < relative_error(W, naive)
    assert relative_error(W, refit) <= relative_error(W, f) + 1e-6


def test_stack_quantization_matches_per_matrix():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 2, 200, 130, generator=g)
    q, s = fp8.quantize_stack(w)
    assert q.shape == w.shape and s.shape == (3, 2, 2, 2)
    q0, s0 = fp8.quantize(w[2, 1])
    assert torch.equal(q[2, 1].view(torch.uint8), q0.view(torch.uint8)) and torch.equal(s[2, 1], s0)
    back = fp8.dequantize_stack(q, s, out_dtype=torch.float32)
    assert torch.equal(back[2, 1], fp8.dequantize(q0, s0, out_dtype=torch.float32))
