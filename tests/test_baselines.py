"""Baselines (--method svd|molae|delta): budgets, closed-form optimality, and checkpoints that
verify, export and generate understand."""

from __future__ import annotations

import json

import pytest
import torch

from mobe_stream.checkpoint.families import get_family
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.factorize import (
    LowRankFactors,
    MethodPlan,
    MoBESpec,
    factors_from_tensors,
    fit_baseline,
    fit_lowrank,
    plan_method,
    relative_error,
)
from mobe_stream.model_info import describe
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.export import ExportOptions, export
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.runtime.model import load_model
from mobe_stream.synth import make_tiny_moe
from mobe_stream.verify import verify

from .helpers import run_cli

IDS = torch.tensor([[5, 17, 2, 99, 41, 8, 23, 64]])


def _experts(E=8, p=12, d=20, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(1, p, d, generator=g) + 0.5 * torch.randn(E, p, d, generator=g)


@pytest.mark.parametrize("method", ["svd", "delta", "molae"])
@pytest.mark.parametrize("E,p,d,m,r,G", [(64, 48, 128, 8, 48, 1), (128, 96, 256, 16, 64, 2), (32, 64, 64, 4, 32, 4)])
def test_budget_is_the_largest_rank_within_mobe_params(method, E, p, d, m, r, G):
    spec = MoBESpec(m, r, "silu", G)
    budget = plan_method("mobe", E, p, d, spec).params(E, p, d)
    plan = plan_method(method, E, p, d, spec)
    assert plan.method == method and plan.params(E, p, d) <= budget
    bigger = MethodPlan(plan.method, plan.rank + 1, plan.num_bases, plan.groups, plan.activation)
    assert bigger.params(E, p, d) > budget or plan.rank == min(p, d)


def test_budget_too_small_is_a_clear_error():
    with pytest.raises(ValueError, match="leaves no rank"):
        plan_method("delta", 4, 8, 8, MoBESpec(1, 1, "silu", 1))


def test_svd_is_per_expert_eckart_young():
    W = _experts()
    f = fit_lowrank(W, rank=5)
    for e in range(W.shape[0]):
        s = torch.linalg.svdvals(W[e])
        err = torch.linalg.norm(W[e] - f.reconstruct([e])[0])
        assert err == pytest.approx(float(s[5:].norm()), rel=1e-4)


def test_delta_subtracts_group_means():
    W = _experts(E=8)
    f = fit_lowrank(W, rank=3, groups=2, with_mean=True)
    assert torch.allclose(f.mean[0], W[:4].mean(0), atol=1e-6) and torch.allclose(f.mean[1], W[4:].mean(0), atol=1e-6)
    R = W[6] - W[4:].mean(0)
    err = torch.linalg.norm(W[6] - f.reconstruct([6])[0])
    assert err == pytest.approx(float(torch.linalg.svdvals(R)[3:].norm()), rel=1e-4)
    # the shared mean is worth having on experts with a common component
    assert relative_error(W, f) < relative_error(W, fit_lowrank(W, rank=3))


def test_molae_is_the_stacked_svd_optimum():
    W = _experts(E=8)
    plan = MethodPlan("molae", 6, 1, 1, "identity")
    f = fit_baseline(W, plan)
    s = torch.linalg.svdvals(W.reshape(-1, W.shape[-1]))
    assert relative_error(W, f) == pytest.approx(float(s[6:].norm() / s.norm()), rel=1e-4)


def test_factors_round_trip_through_stored_names():
    W = _experts()
    f = fit_lowrank(W, rank=4, groups=2, with_mean=True)
    plan = MethodPlan("delta", 4, 0, 2, "identity")
    assert set(plan.shapes(8, 12, 20)) == {"lowrank_U", "lowrank_V", "lowrank_mean"}
    g = factors_from_tensors(plan, {"lowrank_U": f.U, "lowrank_V": f.V, "lowrank_mean": f.mean})
    assert isinstance(g, LowRankFactors) and torch.equal(g.reconstruct(), f.reconstruct())


@pytest.mark.parametrize("method", ["svd", "delta", "molae"])
def test_baseline_checkpoint_verifies_exports_and_generates(tmp_path, method):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe", dtype=torch.float32, structured=True)
    out = tmp_path / "out"
    summary = compress(src, out, CompressOptions(method=method, num_bases=4, rank=16, groups=2, dtype="fp32",
                                                 checkpoint_every=1e9))
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["mobe"]["method"] == method == summary["method"]
    assert cfg["mobe"]["solver"] is None and cfg["mobe"]["init"] is None
    projected = describe(src, num_bases=4, rank=16, groups=2, dtype="fp32", method=method)["projection"]
    assert (projected["method"], projected["rank"]) == (method, cfg["mobe"]["rank"])
    assert projected["expert_params_after"] == summary["expert_params_after"]
    assert verify(out) == []
    plan = MethodPlan.from_config(cfg["mobe"])
    layer = cfg["mobe"]["layers"][0]
    with CheckpointReader(src) as rs, CheckpointReader(out) as ro:
        W = get_family(rs.config, rs).expert_stack(rs, layer, "up_proj", torch.float32)
        pre = f"model.layers.{layer}.mlp.experts.up_proj."
        f = factors_from_tensors(plan, {s: ro.get(pre + s, torch.float32) for s in plan.shapes(1, 1, 1)})
        assert not any(".experts.0.up_proj" in n for n in ro.names())
    assert relative_error(W, f) == pytest.approx(cfg["mobe"]["errors"][str(layer)]["up_proj"], rel=1e-4)
    exported = tmp_path / "exported"
    export(out, exported, ExportOptions(dtype="fp32"))
    assert verify(exported) == []
    a, b = load_model(out), load_model(exported)
    try:
        la, lb = a.forward(IDS), b.forward(IDS)
    finally:
        a.close()
        b.close()
    assert float((la - lb).norm() / lb.norm()) < 1e-4


def test_cli_method_on_fp8_deepseek(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="deepseek_v3", fp8=True)
    out = tmp_path / "out"
    proc = run_cli("compress", str(src), "--out", str(out), "--method", "delta", "--reduction", "0.3", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert json.loads((out / "config.json").read_text())["mobe"]["method"] == "delta"
    proc = run_cli("generate", str(out), "--prompt", "hello", "--max-new-tokens", "3")
    assert proc.returncode == 0, proc.stderr
    text = tmp_path / "t.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 8)
    proc = run_cli("eval", str(out), "--text", str(text), "--ctx", "16", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["perplexity"] > 1
    bad = run_cli("compress", str(src), "--out", str(tmp_path / "x"), "--method", "pca")
    assert bad.returncode == 2 and "unknown --method 'pca'" in bad.stderr


def test_resume_refuses_another_method_and_finishes_the_same_one(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    opts = dict(num_bases=4, rank=16, checkpoint_every=1e9)
    compress(src, out, CompressOptions(method="svd", **opts))
    with pytest.raises(Exception, match="method"):
        compress(src, out, CompressOptions(method="delta", resume=True, **opts))
    summary = compress(src, out, CompressOptions(method="svd", resume=True, **opts))
    assert summary["method"] == "svd" and verify(out) == []
