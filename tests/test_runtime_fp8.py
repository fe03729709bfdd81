"""FP8 sources stay FP8 in the runtime (1 byte/param + scales, dequantized at use), with logits
identical to dequantizing at load, planned at stored size, and disk offload never converting them."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import save_file
from typer.testing import CliRunner

from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.checkpoint.safetensors_io import read_header
from mobe_stream.cli_runtime import register
from mobe_stream.runtime.model import load_model
from mobe_stream.runtime.weights import unit_scales, unit_tensors, unit_working_bytes
from mobe_stream.synth import make_tiny_moe
from tests.test_runtime_device_map import _run

app = typer.Typer()
register(app)
runner = CliRunner()


def dequantized_copy(src: Path, out: Path, dtype: torch.dtype) -> Path:
    """The same model with every FP8 weight dequantized to `dtype` by the reader (the runtime's old
    load-time path), scales and quantization_config dropped: the oracle for dequantize-at-use."""
    out.mkdir(parents=True)
    with CheckpointReader(src) as r:
        scales = {r.scale_of(n) for n in r.names()} - {None}
        sd = {n: (r.get(n, dtype) if r.scale_of(n) else r.get(n).clone()) for n in r.names() if n not in scales}
        cfg = dict(r.config)
    cfg.pop("quantization_config", None)
    save_file(sd, str(out / "model.safetensors"))
    (out / "config.json").write_text(json.dumps(cfg))
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "generation")):
            shutil.copy(f, out / f.name)
    return out


@pytest.mark.parametrize("family,layout,dtype", [("deepseek_v3", "per_expert", torch.bfloat16),
                                                 ("kimi_k2", "fused", torch.bfloat16),
                                                 ("kimi_k2", "per_expert", torch.float32)])
def test_fp8_logits_equal_dequantize_at_load(tmp_path, family, layout, dtype):
    src = make_tiny_moe(tmp_path / "m", family, fp8=True, layout=layout, num_shards=2)
    ref, ref_inc, _ = _run(dequantized_copy(src, tmp_path / "deq", dtype), dtype=dtype)
    for name, kw in (("memory", {}), ("cpu-offload", {"device_map": "auto", "max_memory": "cpu=1GB"}),
                     ("disk-offload", {"device_map": "auto", "max_memory": "cpu=1,disk"})):
        folder = tmp_path / f"off-{name}"
        got, inc, plan = _run(src, dtype=dtype, offload_folder=folder, **kw)
        assert name != "disk-offload" or set(plan.values()) == {"disk"}
        # identical, not close: same fp8.dequantize (fp32, rounded once), same ops
        assert torch.equal(got, ref) and torch.equal(inc, ref_inc), name
        # the offload folder keeps only disk tensors cast to another dtype (the bf16 norms and embeddings of
        # an fp32 run), never an FP8 weight or its scale: those stay as stored and are dequantized at use
        written = {n for f in folder.glob("*.safetensors") for n in read_header(f).tensors}
        assert bool(written) == (name == "disk-offload" and dtype == torch.float32), name
        with CheckpointReader(src) as r:
            assert not any(r.scale_of(n) or n.endswith("_scale_inv") for n in written), name


def test_fp8_weights_held_at_one_byte_per_param(tmp_path):
    src = make_tiny_moe(tmp_path / "m", "kimi_k2", fp8=True, layout="fused", num_shards=2)
    deq = dequantized_copy(src, tmp_path / "deq", torch.bfloat16)
    m = load_model(src, dtype=torch.bfloat16)
    m_deq = load_model(deq, dtype=torch.bfloat16)
    try:
        r = m.reader
        for i in range(m.cfg.num_layers):
            unit = f"layers.{i}"
            names = unit_tensors(r, m.cfg, unit)
            scales = unit_scales(r, names)
            assert scales, "every layer of the FP8 model has FP8 weights"
            header = sum(r.info(n).nbytes for n in names.values()) + sum(r.info(s).nbytes for s in scales.values())
            held = m.store.resident[unit]
            assert held.nbytes() == header  # as stored, not the 2x of a bf16 copy
            assert all(held.tensors[rel].dtype == torch.float8_e4m3fn for rel in scales)
            # planned = stored bytes + working room for one dequantized MLP/expert (+ fp32 temporaries;
            # at this tiny size the room outweighs the weights, at Kimi-K2's it is ~1%)
            work = unit_working_bytes(r, m.cfg, unit, torch.bfloat16)
            assert m.unit_sizes[unit] == header + work and work > 0
            assert header < 0.6 * m_deq.store.resident[unit].nbytes()
    finally:
        m.close()
        m_deq.close()


@pytest.fixture(scope="module")
def tiny_fp8(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("fp8") / "ds", "deepseek_v3", fp8=True, num_shards=2)


def test_cli_disk_offload_writes_nothing(tiny_fp8, tmp_path):
    folder = tmp_path / "off"
    res = runner.invoke(app, ["generate", str(tiny_fp8), "-p", "hi", "--max-new-tokens", "2", "--max-memory",
                              "cpu=1,disk", "--offload-folder", str(folder), "--print-device-map"])
    assert res.exit_code == 0, res.output
    assert "disk" in res.stderr and not folder.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_missing_gpu_is_one_line_exit_2(tiny_fp8):
    for args, want in ((["--max-memory", "0=1GiB"], "max_memory names GPU 0 but no CUDA device is available"),
                       (["--device-map", "cuda:1"], "device map names GPU 1 but no CUDA device is available")):
        res = runner.invoke(app, ["generate", str(tiny_fp8), "-p", "hi", *args])
        assert res.exit_code == 2 and want in res.stderr, res.output
        assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output


def test_dry_run_plans_gpus_that_are_not_here(tiny_fp8, monkeypatch):
    def no_read(*a, **k):
        raise AssertionError("--dry-run read a weight")

    monkeypatch.setattr(CheckpointReader, "get", no_read)
    monkeypatch.setattr(CheckpointReader, "get_expert", no_read)
    for cmd in (["generate", str(tiny_fp8), "-p", "hi"], ["eval", str(tiny_fp8), "--text", "unused.txt"]):
        # balanced: layer-granular over both GPUs (auto may take the expert-granular plan, which computes on GPU 0
        # only); a MoE layer plans room for a batch of all 8 experts dequantized (weights.unit_working_bytes)
        res = runner.invoke(app, [*cmd, "--dry-run", "--print-device-map", "--device-map", "balanced",
                                  "--max-memory", "0=10MiB,1=10MiB,cpu=6MiB,disk"])
        assert res.exit_code == 0, res.output
        lines = res.stdout.splitlines()
        devices = {line.split("->")[1].split()[0] for line in lines if "->" in line}
        assert {"0", "1"} <= devices and lines[-1].startswith("total:")
