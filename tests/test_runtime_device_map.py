"""Device map planning (accelerate semantics) and offloaded execution giving identical logits."""

from __future__ import annotations

import math

import pytest
import torch

from mobe_stream.errors import ConfigError, ResourceError
from mobe_stream.runtime.device_map import parse_max_memory, plan_device_map
from mobe_stream.runtime.model import load_model
from mobe_stream.sizes import parse_size
from mobe_stream.synth import make_tiny_moe

SIZES = {"embed": 100, "layers.0": 300, "layers.1": 300, "layers.2": 300, "layers.3": 300, "norm": 1, "lm_head": 100}


def test_units():
    assert parse_size("20GiB") == 20 * 2**30 and parse_size("5GB") == 5 * 10**9
    assert parse_size("3MiB") == 3 * 2**20 and parse_size("3MB") == 3 * 10**6
    assert parse_size("2KiB") == 2048 and parse_size("2KB") == 2000 and parse_size(123) == 123
    mm = parse_max_memory("0=20GiB,cpu=64GiB,disk")
    assert mm == {0: 20 * 2**30, "cpu": 64 * 2**30, "disk": math.inf}
    assert parse_max_memory("cuda:1=1GB") == {1: 10**9}
    with pytest.raises(ConfigError):
        parse_max_memory("tpu=3GB")
    with pytest.raises(ConfigError):
        parse_size("12 parsecs")


def test_greedy_order_and_reservation():
    # GPU 1000 B minus 300 reserved for the largest layer: embed + 2 layers fit (700), then cpu.
    plan = plan_device_map(SIZES, {0: 1000, "cpu": 1000, "disk": math.inf})
    assert list(plan) == list(SIZES)
    assert [plan[u] for u in SIZES] == [0, 0, 0, "cpu", "cpu", "cpu", "disk"]
    # without a later device nothing is reserved on the last one
    assert set(plan_device_map(SIZES, {"cpu": 1401}).values()) == {"cpu"}
    with pytest.raises(ResourceError):
        plan_device_map(SIZES, {"cpu": 1000})


def test_layers_never_split_and_order_kept():
    plan = plan_device_map(SIZES, {0: 750, "cpu": 650, "disk": math.inf})
    devs = [plan[u] for u in SIZES]
    rank = {0: 0, "cpu": 1, "disk": 2}
    assert all(rank[a] <= rank[b] for a, b in zip(devs, devs[1:], strict=False))  # monotone in module order


def test_balanced_over_gpus_and_cpu_strategy():
    plan = plan_device_map(SIZES, {0: 10**6, 1: 10**6, "cpu": 10**6}, "balanced")
    on0 = sum(SIZES[u] for u, d in plan.items() if d == 0)
    on1 = sum(SIZES[u] for u, d in plan.items() if d == 1)
    assert on0 and on1 and abs(on0 - on1) <= 2 * max(SIZES.values())
    seq = plan_device_map(SIZES, {0: 10**6, 1: 10**6, "cpu": 10**6}, "sequential")
    assert set(seq.values()) == {0}
    assert set(plan_device_map(SIZES, "cpu=1GB", "cpu").values()) == {"cpu"}


def _run(path, **kw):
    m = load_model(path, **kw)
    try:
        ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
        cache = m.new_cache()
        inc = torch.cat([m(ids[:, :3], cache)[0], m(ids[:, 3:4], cache)[0], m(ids[:, 4:], cache)[0]])
        return m(ids)[0], inc, m.plan
    finally:
        m.close()


@pytest.mark.parametrize("family,fp8,dtype,layout", [("qwen3_moe", False, torch.float32, "per_expert"),
                                                     ("deepseek_v3", True, torch.bfloat16, "per_expert"),
                                                     ("kimi_k2", True, torch.bfloat16, "fused"),
                                                     ("kimi_k2", False, torch.bfloat16, "per_expert")])
def test_offloaded_runs_match_in_memory(tmp_path, family, fp8, dtype, layout):
    src = make_tiny_moe(tmp_path / "m", family, fp8=fp8, layout=layout, num_shards=2)
    ref, ref_inc, _ = _run(src, dtype=dtype)
    for max_memory in ("cpu=1GB", "cpu=1,disk"):
        folder = tmp_path / f"off{len(max_memory)}"
        got, inc, plan = _run(src, dtype=dtype, device_map="auto", max_memory=max_memory, offload_folder=folder)
        if "disk" in max_memory:
            assert set(plan.values()) == {"disk"}
        # disk offload reads the source shards; nothing converted is ever written (FP8 or not)
        assert not folder.exists() or not any(folder.iterdir())
        assert torch.equal(got, ref) and torch.equal(inc, ref_inc)


def test_disk_offload_of_fp32_source_copies_nothing(tmp_path):
    src = make_tiny_moe(tmp_path / "m", "qwen3_moe", dtype=torch.float32, num_shards=1)
    folder = tmp_path / "off"
    ref, _, _ = _run(src)
    got, _, plan = _run(src, device_map="auto", max_memory="cpu=1,disk", offload_folder=folder)
    assert torch.equal(got, ref) and not folder.exists()
