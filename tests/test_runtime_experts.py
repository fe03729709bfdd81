"""`--device-map experts`: non-expert weights on the compute device, routed experts on cpu/disk
fetched per forward through a byte-bounded LRU. Logits must be bit-identical (torch.equal) to the
in-memory plan: the same stored bytes reach the same kernels, only their location differs."""

from __future__ import annotations

import json

import pytest
import torch

from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.runtime.config import parse_config
from mobe_stream.runtime.expert_plan import CACHE_KEY, experts_key
from mobe_stream.runtime.generate import generate
from mobe_stream.runtime.model import load_model, plan_model, resolve_dtype
from mobe_stream.runtime.tokenizer import Tokenizer
from mobe_stream.synth import make_tiny_moe

from .helpers import run_cli

IDS = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12]])
CASES = [("qwen3_moe", False, torch.float32, "per_expert"),
         ("deepseek_v3", True, torch.bfloat16, "per_expert"),
         ("kimi_k2", True, torch.bfloat16, "fused")]


def _model(tmp_path, family, fp8, layout, form):
    src = make_tiny_moe(tmp_path / "orig", family, fp8=fp8, layout=layout, num_shards=2)
    if form == "original":
        return src
    out = tmp_path / "mobe"
    compress(src, out, CompressOptions(num_bases=4, rank=16, steps=5, checkpoint_every=1e9))
    return out


def _run(path, dtype, **kw):
    """(full-sequence logits, incremental logits with a KV cache, plan, expert stats)."""
    m = load_model(path, dtype=dtype, **kw)
    try:
        cache = m.new_cache()
        inc = torch.cat([m(IDS[:, :5], cache)[0], m(IDS[:, 5:6], cache)[0], m(IDS[:, 6:], cache)[0]])
        return m(IDS)[0], inc, m.plan, m.expert_stats()
    finally:
        m.close()


def _resident(path, dtype) -> int:
    """Bytes the experts plan needs on the compute device without a cache (from headers)."""
    with CheckpointReader(path) as r:
        plan, sizes = plan_model(r, parse_config(r.config, r.config_path), resolve_dtype(dtype), "experts",
                                 "cpu=64GiB", expert_cache=0)
    return sum(b for k, b in sizes.items() if plan[k] == "cpu" and not k.endswith(".experts"))


@pytest.mark.parametrize("form", ["original", "mobe"])
@pytest.mark.parametrize("family,fp8,dtype,layout", CASES)
def test_expert_plan_logits_equal_in_memory(tmp_path, family, fp8, dtype, layout, form):
    path = _model(tmp_path, family, fp8, layout, form)
    ref, ref_inc, _, none = _run(path, dtype)
    assert none is None  # other plans report no expert cache
    # experts in RAM, default cache
    got, inc, plan, st = _run(path, dtype, device_map="experts", max_memory="cpu=1GB")
    assert torch.equal(got, ref) and torch.equal(inc, ref_inc)
    assert {plan[k] for k in plan if k.endswith(".experts")} == {"cpu"}
    assert st["misses"] > 0 and st["hits"] > 0  # the full pass re-routes experts the cached passes loaded
    # experts on disk (RAM holds only the resident part), a 1-byte cache: every routed expert travels
    got, inc, plan, st = _run(path, dtype, device_map="experts", max_memory=f"cpu={_resident(path, dtype) + 1},disk",
                              expert_cache=1)
    assert torch.equal(got, ref) and torch.equal(inc, ref_inc)
    assert {plan[k] for k in plan if k.endswith(".experts")} == {"disk"}
    assert st["hits"] == 0 and st["cache_bytes"] == 0 and st["transfers"] == st["misses"] > 0


def test_cache_evicts_by_bytes(tmp_path):
    path = make_tiny_moe(tmp_path / "m", "kimi_k2", fp8=True, layout="fused", num_shards=2)
    ref, ref_inc, _, _ = _run(path, torch.bfloat16)
    with CheckpointReader(path) as r:
        _, sizes = plan_model(r, parse_config(r.config, r.config_path), torch.bfloat16, "experts", "cpu=1GB")
    one = sizes["expert_staging"] // 2  # top_k = 2 in the tiny model: one expert's bytes
    got, inc, plan, st = _run(path, torch.bfloat16, device_map="experts", max_memory="cpu=1GB",
                              expert_cache=int(2.5 * one))
    assert torch.equal(got, ref) and torch.equal(inc, ref_inc)
    assert st["evictions"] > 0 and st["cached_experts"] == 2 and st["cache_bytes"] <= st["cache_max_bytes"]


def test_repeated_prompt_hits_the_cache(tmp_path):
    path = make_tiny_moe(tmp_path / "m", "deepseek_v3", fp8=True, num_shards=2)
    m = load_model(path, dtype=torch.bfloat16, device_map="experts", max_memory="cpu=1GB")
    try:
        tok = Tokenizer(path)
        tok.eos_ids = set()
        first = generate(m, tok, "the the the the", 4, stream=None)
        again = generate(m, tok, "the the the the", 4, stream=None)
    finally:
        m.close()
    assert first.token_ids == again.token_ids
    assert first.expert_cache["misses"] > 0
    # every (layer, expert) the second call routes to was loaded by the first and the cache holds all
    assert again.expert_cache["misses"] == 0 and again.expert_cache["hit_rate"] == 1.0


def test_dry_run_shows_the_split_for_a_gpu_plan(tmp_path):
    path = make_tiny_moe(tmp_path / "m", "kimi_k2", fp8=True, num_shards=2)
    p = run_cli("generate", str(path), "-p", "x", "--device-map", "experts", "--max-memory", "0=1GiB,cpu=2MB,disk",
                "--expert-cache", "1MiB", "--dry-run", check=True)
    lines = {k.strip(): v.split() for k, v in (line.split(" -> ") for line in p.stdout.splitlines() if " -> " in line)}
    assert lines["layers.0"][0] == lines["lm_head"][0] == "0"  # non-expert weights on the GPU
    # cpu=2MB holds one MoE layer's experts (1.18 MB each); the next stays whole on the GPU
    assert lines[experts_key(1)][0] == "cpu" and lines[experts_key(2)][0] == "0"
    assert lines[CACHE_KEY] == ["0", "1,048,576", "B"]
    # a GPU with no room beyond the resident part and the cache: that layer goes to the source shards
    resident = sum(int(v[1].replace(",", "")) for k, v in lines.items() if v[0] == "0" and not k.endswith(".experts"))
    p = run_cli("generate", str(path), "-p", "x", "--device-map", "experts", "--max-memory",
                f"0={resident + 1000},cpu=2MB,disk", "--expert-cache", "1MiB", "--dry-run", check=True)
    lines = {k.strip(): v.split() for k, v in (line.split(" -> ") for line in p.stdout.splitlines() if " -> " in line)}
    assert lines[experts_key(1)][0] == "cpu" and lines[experts_key(2)][0] == "disk"


def test_cli_generate_and_budget_errors(tmp_path):
    path = make_tiny_moe(tmp_path / "m", "qwen3_moe", num_shards=2)
    p = run_cli("generate", str(path), "-p", "hello hello", "--max-new-tokens", "3", "--device-map", "experts",
                "--max-memory", "cpu=1GB", "--json", check=True)
    d = json.loads(p.stdout)
    assert d["new_tokens"] <= 3 and d["expert_cache"]["hits"] + d["expert_cache"]["misses"] > 0
    assert d["device_map"]["layers.1.experts"] == "cpu"
    small = run_cli("generate", str(path), "-p", "x", "--device-map", "experts", "--max-memory", "cpu=100KB")
    assert small.returncode == 2 and len(small.stderr.strip().splitlines()) == 1
    assert "non-expert part" in small.stderr and str(path) in small.stderr
    cache = run_cli("generate", str(path), "-p", "x", "--device-map", "experts", "--max-memory", "cpu=1GB",
                    "--expert-cache", "1GiB")
    assert cache.returncode == 0  # capped at all expert bytes, not refused
    wrong = run_cli("generate", str(path), "-p", "x", "--expert-cache", "1GiB")
    assert wrong.returncode == 2 and "--expert-cache" in wrong.stderr
