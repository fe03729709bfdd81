"""Kimi-K2 at true scale, headers only: the fixture's names, shapes, dtypes and shards, and inspect's
projections (parameters and honest FP8 bytes) and compress's refusals on it."""

from __future__ import annotations

import json
import math
import os
import shutil

import pytest
import torch

from mobe_stream.checkpoint import fp8
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.model_info import describe
from mobe_stream.pipeline.job import make_job
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.synth.true_shape import is_sparse, make_true_shape

from .helpers import run_cli

L, E, P, D, V = 61, 384, 2048, 7168, 163840
MOE_LAYERS = L - 1  # first_k_dense_replace = 1
# per layer: 5 FP8 attention projections + scales, 4 norms, rotary inv_freq; dense MLP 3 + scales;
# MoE: router weight + bias, 384 x 3 experts + scales, shared expert 3 + scales; embed, norm, lm_head
ATTN = 5 * 2 + 4 + 1
N_TENSORS = 3 + (ATTN + 3 * 2) + MOE_LAYERS * (ATTN + 2 + E * 3 * 2 + 3 * 2)


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    root = tmp_path_factory.mktemp("true_shape")
    if shutil.disk_usage(root).free < 200 << 20:
        pytest.skip("needs ~50 MB of real disk for headers")
    try:
        return make_true_shape(root / "kimi", "kimi_k2", sparse=True)
    except ValueError as e:
        if "holes" in str(e):
            pytest.skip(f"filesystem without sparse files: {e}")
        raise


def test_names_shapes_dtypes_and_config(kimi):
    cfg = json.loads((kimi / "config.json").read_text())
    assert (cfg["model_type"], cfg["architectures"]) == ("kimi_k2", ["DeepseekV3ForCausalLM"])
    dims = ("hidden_size", "moe_intermediate_size", "intermediate_size", "num_hidden_layers")
    assert tuple(cfg[k] for k in dims) == (D, P, 18432, L)
    moe = ("n_routed_experts", "n_shared_experts", "num_experts_per_tok", "first_k_dense_replace")
    assert tuple(cfg[k] for k in moe) == (E, 1, 8, 1)
    assert (cfg["n_group"], cfg["topk_group"], cfg["routed_scaling_factor"], cfg["vocab_size"]) == (1, 1, 2.827, V)
    assert (cfg["q_lora_rank"], cfg["kv_lora_rank"], cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"],
            cfg["num_attention_heads"]) == (1536, 512, 128, 64, 128, 64)
    assert cfg["rope_scaling"]["factor"] == 32.0 and cfg["rope_scaling"]["original_max_position_embeddings"] == 4096
    assert cfg["quantization_config"] == {**cfg["quantization_config"], "quant_method": "fp8", "fmt": "e4m3",
                                          "weight_block_size": [128, 128]}
    with CheckpointReader(kimi) as r:
        assert len(r) == N_TENSORS == 139644
        want = {
            "model.layers.5.mlp.experts.17.gate_proj.weight": ("F8_E4M3", (P, D)),
            "model.layers.5.mlp.experts.17.gate_proj.weight_scale_inv": ("F32", (16, 56)),
            "model.layers.60.mlp.experts.383.down_proj.weight": ("F8_E4M3", (D, P)),
            "model.layers.60.mlp.experts.383.down_proj.weight_scale_inv": ("F32", (56, 16)),
            "model.layers.5.mlp.gate.weight": ("BF16", (E, D)),
            "model.layers.5.mlp.gate.e_score_correction_bias": ("F32", (E,)),
            "model.layers.5.mlp.shared_experts.up_proj.weight": ("F8_E4M3", (P, D)),
            "model.layers.0.mlp.gate_proj.weight": ("F8_E4M3", (18432, D)),
            "model.layers.0.mlp.down_proj.weight_scale_inv": ("F32", (56, 144)),
            "model.layers.7.self_attn.q_a_proj.weight": ("F8_E4M3", (1536, D)),
            "model.layers.7.self_attn.q_b_proj.weight": ("F8_E4M3", (64 * 192, 1536)),
            "model.layers.7.self_attn.kv_a_proj_with_mqa.weight_scale_inv": ("F32", (5, 56)),
            "model.layers.7.self_attn.kv_b_proj.weight": ("F8_E4M3", (64 * 256, 512)),
            "model.layers.7.self_attn.o_proj.weight": ("F8_E4M3", (D, 64 * 128)),
            "model.layers.7.self_attn.kv_a_layernorm.weight": ("BF16", (512,)),
            "model.layers.7.self_attn.rotary_emb.inv_freq": ("F32", (32,)),
            "model.layers.7.input_layernorm.weight": ("BF16", (D,)),
            "model.embed_tokens.weight": ("BF16", (V, D)),
            "model.norm.weight": ("BF16", (D,)),
            "lm_head.weight": ("BF16", (V, D)),
        }
        assert {n: (r.info(n).dtype, r.info(n).shape) for n in want} == want
        assert "model.layers.61.input_layernorm.weight" not in r  # Kimi-K2 stores no MTP layer
        assert r.get("model.layers.5.mlp.experts.17.gate_proj.weight_scale_inv").abs().sum() == 0  # holes read as zeros


def test_shards_are_sparse_and_true_size(kimi):
    shards = sorted(kimi.glob("*.safetensors"))
    assert {p.name for p in shards} == {f"model-{i}-of-62.safetensors" for i in range(1, 63)}
    apparent = sum(p.stat().st_size for p in shards)
    allocated = sum(os.stat(p).st_blocks * 512 for p in shards)
    assert all(is_sparse(p) for p in shards) and allocated < 100e6
    with CheckpointReader(kimi) as r:
        data = sum(r.info(n).nbytes for n in r.names())
    index = json.loads((kimi / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == data
    assert apparent == pytest.approx(1.03e12, rel=0.01) and apparent - data < 50e6  # headers only on top


def test_inspect_projects_parameters_and_fp8_bytes(kimi):
    auto = describe(kimi, reduction=0.25)
    assert auto["expert_params"] == MOE_LAYERS * E * 3 * P * D
    assert auto["moe_layers"] == list(range(1, L)) and auto["fp8_block"] == [128, 128]
    pr = auto["projection"]
    assert pr["dtype"] == "float8_e4m3fn" and pr["expert_reduction"] == pytest.approx(0.25, abs=0.005)
    # FP8 stays FP8: bytes fall at least as much as parameters
    assert pr["source_bytes_ratio"] == pr["output_bytes"] / auto["size_bytes"] <= 0.78
    assert pr["source_bytes_ratio"] <= 1 - pr["total_reduction"] + 0.01
    bf16 = describe(kimi, reduction=0.25, dtype="bf16")["projection"]
    assert bf16["dtype"] == "bfloat16" and bf16["source_bytes_ratio"] > 1  # widening FP8 to bf16 grows the model
    assert bf16["params_after"] == pr["params_after"]


def test_cli_inspect_json(kimi):
    proc = run_cli("inspect", str(kimi), "--reduction", "0.25", "--json", check=True, timeout=300)
    info = json.loads(proc.stdout)
    assert info["projection"] == describe(kimi, reduction=0.25)["projection"]


def test_compress_refuses_cleanly(kimi, tmp_path):
    with CheckpointReader(kimi) as r:  # auto on an FP8 source is FP8 factors, as inspect projects
        job = make_job(kimi, tmp_path / "o", CompressOptions(reduction=0.25), r)
        assert job.output.is_fp8 and job.output.block == (128, 128)
    # 1 TB source: the working set and the output fit neither this machine's RAM nor its disk
    proc = run_cli("compress", str(kimi), "--out", str(tmp_path / "out"), "--reduction", "0.25", "--quiet", timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and "--force" in proc.stderr
    assert not any((tmp_path / "out").iterdir())  # refused before any journal or shard


def test_fp8_stored_bytes_blocks_per_matrix():
    fp8_t = fp8.FP8_DTYPE
    assert fp8.stored_bytes((P, D), fp8_t) == P * D + 16 * 56 * 4
    assert fp8.stored_bytes((200, 130), fp8_t) == 200 * 130 + 2 * 2 * 4  # partial edge blocks count whole
    assert fp8.stored_bytes((E, P, P), fp8_t) == E * (P * P + 16 * 16 * 4)  # A [E, p, r]: one scale grid per expert
    assert fp8.stored_bytes((1, 130, P, D), fp8_t) == 130 * (P * D + 16 * 56 * 4)  # B [G, m_g, r, d]: per basis
    assert fp8.stored_bytes((E, 130), torch.float32) == E * 130 * 4
    assert fp8.stored_bytes((E, P, D), torch.bfloat16) == 2 * math.prod((E, P, D))


def _dry_run_plan(kimi, max_memory: str) -> tuple[dict, dict]:
    proc = run_cli("generate", str(kimi), "--prompt", "x", "--dry-run", "--print-device-map",
                   "--max-memory", max_memory, timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = [line.split() for line in proc.stdout.splitlines() if "->" in line]
    return {r[0]: r[2] for r in rows}, {r[0]: int(r[3].replace(",", "")) for r in rows}


def test_runner_plans_kimi_fp8_as_stored(kimi):
    """FP8 planned as stored (1 byte a parameter), from headers only (--dry-run, no GPU needed).

    Layer-granular arithmetic: the model is 958.5 GiB as stored; accelerate's rule reserves room for
    the largest unit (16.2 GiB) on every device but the last, so 70 GiB + 900 GiB leaves 5 layers
    on disk (they were 48 of 61 when FP8 was planned as bf16); 70 GiB + 960 GiB holds everything.
    At 900 GiB `auto` therefore takes the expert-granular plan, which keeps everything off the disk.
    """
    devices, sizes = _dry_run_plan(kimi, "0=70GiB,cpu=960GiB,disk")
    assert len(devices) == 61 + 3 and "disk" not in devices.values()
    assert devices["layers.0"] == "0" and "cpu" in devices.values()
    assert 16.5e9 < sizes["layers.5"] < 18.5e9  # ~17 GB stored, not ~34 GB dequantized
    devices, _ = _dry_run_plan(kimi, "0=70GiB,cpu=900GiB,disk")  # the command
    assert "disk" not in devices.values() and "expert_cache" in devices  # auto took the expert-granular plan


def test_layer_granular_plan_at_900_gib_spills_five_layers(kimi):
    proc = run_cli("generate", str(kimi), "--prompt", "x", "--dry-run", "--device-map", "sequential",
                   "--max-memory", "0=70GiB,cpu=900GiB,disk", timeout=300)
    assert proc.returncode == 0, proc.stderr
    devices = [line.split()[2] for line in proc.stdout.splitlines() if "->" in line]
    assert 0 < devices.count("disk") <= 6


def test_expert_plan_keeps_all_of_kimi_off_the_disk(kimi):
    """`--device-map experts` at the issue's budget: non-expert weights and 3 layers' experts on the
    GPU, 57 layers' experts in RAM (57 x 15.75 GiB <= 900 GiB), nothing on disk."""
    proc = run_cli("generate", str(kimi), "--prompt", "x", "--dry-run", "--device-map", "experts",
                   "--max-memory", "0=70GiB,cpu=900GiB,disk", timeout=300)
    assert proc.returncode == 0, proc.stderr
    rows = {r[0]: r[2] for r in (line.split() for line in proc.stdout.splitlines() if "->" in line)}
    experts = {k: v for k, v in rows.items() if k.endswith(".experts")}
    assert len(experts) == 60 and "disk" not in rows.values(), proc.stdout
    assert list(experts.values()).count("0") >= 1 and rows["expert_cache"] == "0"
