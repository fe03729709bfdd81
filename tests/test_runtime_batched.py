"""Routed experts run in batches (moe.expert_batches + one bmm chain per batch), MoBE experts choose
factored or materialised per batch and keep mixed bases in a byte-bounded cache: every choice gives
the same logits, and the cache reports what it did."""

from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

import mobe_stream.runtime.mobe_experts as mobe_experts
from mobe_stream.checkpoint import fp8
from mobe_stream.checkpoint.families import EXPERTS_MODULE, IN_MEMORY, fused_name, per_expert_name
from mobe_stream.factorize.model import mixed_bases, mixed_bases_as
from mobe_stream.runtime.model import load_model
from mobe_stream.runtime.moe import PAD_SLACK, ExpertMath, OriginalExperts, expert_batches, run_experts
from mobe_stream.runtime.unit_weights import UnitWeights
from mobe_stream.synth import make_tiny_moe
from tests.test_runtime_mobe import IDS, mobeify


def _skewed_routing(T: int, E: int, k: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    popularity = torch.rand(E, generator=g) ** 4 + 1e-3  # a few hot experts, many cold ones, some never routed
    popularity[: E // 4] = 0
    idx = torch.stack([torch.multinomial(popularity, k, generator=g) for _ in range(T)])
    return torch.rand(T, k, generator=g), idx


@pytest.mark.parametrize("max_experts", [None, 3])
def test_expert_batches_cover_every_assignment_once(max_experts):
    weights, idx = _skewed_routing(T=97, E=32, k=4)
    batches = expert_batches(idx, weights, max_experts)
    seen = {}
    for b in batches:
        assert max_experts is None or len(b.experts) <= max_experts
        real = b.weights != 0
        counts = real.sum(1)
        assert bool((counts >= 1).all())
        assert b.rows.shape[1] <= PAD_SLACK * counts.min() + 1  # padding bounded by the count classes
        for j, e in enumerate(b.experts.tolist()):
            assert e not in seen
            seen[e] = sorted(zip(b.rows[j][real[j]].tolist(), b.weights[j][real[j]].tolist(), strict=True))
    want = {}
    for t in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            want.setdefault(int(idx[t, j]), []).append((t, float(weights[t, j])))
    assert seen == {e: sorted(v) for e, v in want.items()}


@pytest.mark.parametrize("layout", ["per_expert", "fused"])
def test_batched_experts_equal_a_per_token_loop(layout):
    g = torch.Generator().manual_seed(1)
    E, d, p = 16, 24, 8
    W = {"gate": torch.randn(E, p, d, generator=g), "up": torch.randn(E, p, d, generator=g),
         "down": torch.randn(E, d, p, generator=g)}
    if layout == "fused":
        tensors = {fused_name(EXPERTS_MODULE, "gate_proj"): torch.cat([W["gate"], W["up"]], 1),
                   fused_name(EXPERTS_MODULE, "down_proj"): W["down"]}
    else:
        tensors = {per_expert_name(EXPERTS_MODULE, e, f"{n}_proj"): W[n][e] for e in range(E) for n in ("gate", "up", "down")}
    bank = OriginalExperts(UnitWeights(tensors, {}, torch.float32), p, ExpertMath(IN_MEMORY if layout == "fused" else None), d)
    x = torch.randn(50, d, generator=g)
    weights, idx = _skewed_routing(T=50, E=E, k=3, seed=2)
    got = run_experts(x, weights, idx, bank)
    want = torch.zeros_like(x)
    for t in range(50):
        for j in range(3):
            e = int(idx[t, j])
            h = torch.nn.functional.silu(W["gate"][e] @ x[t]) * (W["up"][e] @ x[t])
            want[t] += weights[t, j] * (W["down"][e] @ h)
    assert (got - want).abs().max() / want.abs().max() < 1e-5


@pytest.mark.parametrize("family,fp8_src", [("kimi_k2", True), ("qwen3_moe", False)])
def test_batch_byte_bound_does_not_change_logits(tmp_path, monkeypatch, family, fp8_src):
    """One expert per batch (EXPERT_BATCH_BYTES = 1) against the default batches: same logits, and
    the planned dequant working room grows with the batch."""
    import mobe_stream.runtime.weights as weights
    from mobe_stream.checkpoint.reader import CheckpointReader
    from mobe_stream.runtime.config import parse_config

    src = make_tiny_moe(tmp_path / "src", family, fp8=fp8_src, dtype=torch.float32, num_shards=1, num_experts=16)
    default = _run(src)
    with CheckpointReader(src) as r:
        cfg = parse_config(r.config, r.config_path)
        big = weights.unit_working_bytes(r, cfg, "layers.1", torch.float32)
        monkeypatch.setattr(weights, "EXPERT_BATCH_BYTES", 1)
        small = weights.unit_working_bytes(r, cfg, "layers.1", torch.float32)
    one = _run(src)
    assert (one - default).abs().max() / default.abs().max() < 1e-6
    assert big > small if fp8_src else big == small == 0


def _run(path, **kw) -> torch.Tensor:
    m = load_model(path, dtype=torch.float32, **kw)
    try:
        return m(IDS)[0]
    finally:
        m.close()


def test_factored_materialised_and_small_batches_agree(tmp_path, monkeypatch):
    src = make_tiny_moe(tmp_path / "src", "kimi_k2", dtype=torch.float32, num_shards=1, num_experts=16)
    mobe, recon = mobeify(src, tmp_path, rank=32)  # r = p: materialising pays from 64 rows per expert on
    ref = _run(recon)
    factored = _run(mobe, mobe_cache=0)
    monkeypatch.setattr(mobe_experts, "CROSSOVER_FACTOR", 0.0)  # every batch materialises A_e M_e
    materialised = _run(mobe, mobe_cache=0)
    monkeypatch.setattr(mobe_experts, "CROSSOVER_FACTOR", 1.0)
    monkeypatch.setattr(mobe_experts, "MIX_BYTES", 1)  # one expert per batch, mixed batch by batch
    one_by_one = _run(mobe, mobe_cache=0)
    for got in (factored, materialised, one_by_one):
        assert (got - ref).abs().max() / ref.abs().max() < 1e-4
    assert not torch.equal(factored, materialised)  # the two forms really ran (they round differently)


def test_mobe_cache_auto_by_default_and_reported(tmp_path):
    from mobe_stream.cli_runtime import register
    from tests.test_runtime_cli import _json

    src = make_tiny_moe(tmp_path / "src", "qwen3_moe", dtype=torch.float32, num_shards=1, num_experts=16)
    mobe, _ = mobeify(src, tmp_path)
    shutil_tok(src, mobe)
    m = load_model(mobe, dtype=torch.float32)
    total = mobe_experts.all_bases_bytes(m.cfg.mobe, 16, m.cfg.hidden_size, torch.float32)
    stats = m.mobe_cache_stats()
    m.close()
    assert stats is not None and stats["cache_max_bytes"] == total  # tiny: all of them fit in a quarter of RAM
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    res = runner.invoke(app, ["generate", str(mobe), "--prompt", "hello there", "--max-new-tokens", "12",
                              "--dtype", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    mc = _json(res)["mobe_cache"]
    assert mc["misses"] > 0 and mc["hits"] > 0 and 0 < mc["hit_rate"] < 1
    assert mc["hit_rate"] == pytest.approx(mc["hits"] / (mc["hits"] + mc["misses"]))
    assert 0 < mc["cache_bytes"] <= mc["cache_max_bytes"]
    res = runner.invoke(app, ["generate", str(mobe), "--prompt", "hello", "--max-new-tokens", "2", "--json",
                              "--mobe-cache", "0"])
    assert res.exit_code == 0 and _json(res)["mobe_cache"] is None
    res = runner.invoke(app, ["generate", str(mobe), "--prompt", "hello", "--mobe-cache", "lots"])
    assert res.exit_code == 2 and "--mobe-cache" in res.output
    res = runner.invoke(app, ["generate", str(src), "--prompt", "hello", "--max-new-tokens", "2", "--json"])
    assert res.exit_code == 0 and _json(res)["mobe_cache"] is None  # not a MoBE checkpoint: no cache


def shutil_tok(src, dst) -> None:
    import shutil

    for f in src.glob("tokenizer*"):
        shutil.copy(f, dst / f.name)


@pytest.mark.parametrize("shape", [(2, 3, 256, 384), (1, 4, 96, 200), (2, 2, 300, 130)])
def test_fp8_bases_mixed_chunk_by_chunk_equal_mixing_the_dequantized_bank(shape):
    G, mg, r, d = shape
    g = torch.Generator().manual_seed(0)
    B = torch.randn(G, mg, r, d, generator=g)
    q, s = fp8.quantize_stack(B.view(G * mg, r, d))
    q, s = q.view(G, mg, r, d), s.view(G, mg, *s.shape[1:])
    deq = fp8.dequantize_stack(q, s, out_dtype=torch.float32)
    E = 4 * G
    alpha = torch.randn(E, mg, generator=g)
    ids = torch.tensor([0, E - 1, 1])
    want = mixed_bases(alpha[ids], deq, ids, E, "silu")
    got = mixed_bases_as(alpha[ids], q, ids, E, "silu", torch.float32, scale=s)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    got16 = mixed_bases_as(alpha[ids], deq, ids, E, "tanh", torch.bfloat16)
    assert torch.equal(got16, mixed_bases(alpha[ids], deq, ids, E, "tanh").to(torch.bfloat16))


@pytest.mark.parametrize("shape", [(3, 256, 200), (2, 130, 256), (2, 200, 130)])
def test_dequantize_batch_partial_blocks_equal_per_matrix(shape):
    w = torch.randn(*shape) * 3
    q, s = fp8.quantize_stack(w)
    assert torch.equal(fp8.dequantize_batch(q, s, out_dtype=torch.float32),
                       fp8.dequantize_stack(q, s, out_dtype=torch.float32))


def test_generate_json_documents_mobe_cache():
    text = open("docs/JSON.md").read()
    assert "mobe_cache" in text and json.dumps("hit_rate").strip('"') in text
