"""Device map planning (accelerate semantics) and offloaded execution giving identical logits."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from mobe_stream.errors import ConfigError, ResourceError
from mobe_stream.runtime.device_map import parse_max_memory, plan_device_map, resolve_device_map
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
    # This used to raise ResourceError. accelerate appends disk to every max_memory (infer_auto_device_map:
    # `if "disk" not in devices: devices.append("disk")`) and offloads what does not fit with a warning, so
    # disk is the last resort here too (test_disk_is_the_last_resort_with_one_warning); a disk given a
    # size too small still fails.
    with pytest.raises(ResourceError):
        plan_device_map(SIZES, {"cpu": 1000, "disk": 10})


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
        # disk offload reads the source shards; only tensors stored in another dtype than they compute in
        # (here the bf16 qwen3 run in fp32) are kept converted in the offload folder, FP8 never
        converted = "disk" in max_memory and family == "qwen3_moe"
        assert (folder / "index.json").exists() == converted
        assert not folder.exists() or converted
        assert torch.equal(got, ref) and torch.equal(inc, ref_inc)


def test_disk_offload_of_fp32_source_copies_nothing(tmp_path):
    src = make_tiny_moe(tmp_path / "m", "qwen3_moe", dtype=torch.float32, num_shards=1)
    folder = tmp_path / "off"
    ref, _, _ = _run(src)
    got, _, plan = _run(src, device_map="auto", max_memory="cpu=1,disk", offload_folder=folder)
    assert torch.equal(got, ref) and not folder.exists()


UNITS = list(SIZES)


def test_balanced_low_0_keeps_gpu_0_for_outputs():
    """accelerate's get_balanced_memory(low_zero=True): GPUs 1..n-1 share the model, GPU 0 holds only
    what they cannot; with one GPU it is plain balanced/auto."""
    three = {0: 10**6, 1: 10**6, 2: 10**6, "cpu": 10**6}
    plan = plan_device_map(SIZES, three, "balanced_low_0")
    assert 0 not in plan.values() and {1, 2} <= set(plan.values())
    assert 0 in plan_device_map(SIZES, three, "balanced").values()
    # GPU 1 cannot hold the model: GPU 0 gets the remainder (1401 - 1000 B: the embedding only)
    plan = plan_device_map(SIZES, {0: 10**6, 1: 1000, "cpu": 10**6}, "balanced_low_0")
    assert [u for u, d in plan.items() if d == 0] == ["embed"] and plan["layers.0"] == 1
    one = {0: 1000, "cpu": 10**6}
    assert plan_device_map(SIZES, one, "balanced_low_0") == plan_device_map(SIZES, one, "auto")


def test_one_device_for_everything():
    assert resolve_device_map("cpu", UNITS) == dict.fromkeys(UNITS, "cpu")
    for spec, gpu in (("cuda", 0), ("cuda:1", 1), ("2", 2), (" CUDA:3 ", 3)):
        assert resolve_device_map(spec, UNITS) == dict.fromkeys(UNITS, gpu), spec
    assert resolve_device_map("Balanced_Low_0", UNITS) == "balanced_low_0"
    for bad in ("tpu", "cuda:x", "disk", "-1"):
        with pytest.raises(ConfigError, match="balanced_low_0, sequential, experts, one device"):
            resolve_device_map(bad, UNITS)


def _map_file(tmp_path, obj, name="map.json") -> str:
    path = tmp_path / name
    path.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(path)


def test_device_map_json_file(tmp_path):
    hf = {"model.embed_tokens": 0, "model.layers": "cpu", "model.layers.3": "disk", "model.norm": "cuda:1",
          "lm_head": "disk", "model.rotary_emb": 0}  # transformers' hf_device_map form
    assert resolve_device_map(_map_file(tmp_path, hf), UNITS) == {
        "embed": 0, "layers.0": "cpu", "layers.1": "cpu", "layers.2": "cpu", "layers.3": "disk", "norm": 1, "lm_head": "disk"}
    ours = {"embed": "cpu", "layers": 1, "layers.0": 0, "norm": "cpu", "lm_head": "cpu"}
    got = resolve_device_map(_map_file(tmp_path, ours), UNITS)
    assert got["layers.0"] == 0 and got["layers.3"] == 1 and got["embed"] == "cpu"
    # prefixes: "" covers everything, "model" what is under it (lm_head is not), the closest key wins
    got = resolve_device_map(_map_file(tmp_path, {"": "disk", "model": "cpu", "layers.2": 0}), UNITS)
    assert got == {**dict.fromkeys(UNITS, "cpu"), "layers.2": 0, "lm_head": "disk"}


@pytest.mark.parametrize("obj,words", [
    ({"model.embed_tokens": 0, "model.layers": 0, "model.norm": 0}, "does not place lm_head"),
    ({"model": 0}, "does not place lm_head"),
    ({"": 0, "model.layers.9": 0}, "unknown module 'model.layers.9'"),
    ({"": 0, "model.layers.2.mlp": 0}, "part of layers.2, and a decoder layer (unit) is never split"),
    ({"": "tpu"}, "unknown device 'tpu'"),
    ({"": True}, "unknown device True"),
    ('{"": 0', "not valid JSON"),
    ('{"": 0, "": 1}', "duplicate key"),
    ("[0]", "expected a JSON object"),
])
def test_device_map_json_errors_name_the_file(tmp_path, obj, words):
    path = _map_file(tmp_path, obj)
    with pytest.raises(ConfigError) as e:
        resolve_device_map(path, UNITS)
    assert str(e.value).startswith(path + ": ") and words in str(e.value) and "\n" not in str(e.value)


def test_max_memory_json_object_and_file(tmp_path):
    want = {0: 20 * 2**30, "cpu": 64 * 2**30, "disk": math.inf}
    text = '{"0": "20GiB", "cpu": "64GiB", "disk": null}'
    assert parse_max_memory(text) == want == parse_max_memory(_map_file(tmp_path, text, "mem.json"))
    assert parse_max_memory('{"cuda:1": 1000, "cpu": 2.5e3}') == {1: 1000, "cpu": 2500}
    for bad, words in (('{"cpu": [1]}', "max_memory[cpu]: expected a size"), ('{"cpu": "12 parsecs"}', "cannot parse"),
                       ('{"cpu": -1}', "must be"), ('{"0": 1, "cuda:0": 2}', "names device 0 twice"),
                       ('{"tpu": 1}', "unknown device 'tpu'"), ('{"cpu": 1', "not valid JSON"), ("[1]", "JSON object")):
        path = _map_file(tmp_path, bad, "bad.json")
        for spec in (bad, path):
            with pytest.raises(ConfigError, match=re.escape(words)) as e:
                parse_max_memory(spec)
            assert "\n" not in str(e.value) and (spec == bad or str(e.value).startswith(path))
    with pytest.raises(ConfigError, match="cannot read"):
        parse_max_memory(str(tmp_path / "missing.json"))


def test_disk_is_the_last_resort_with_one_warning(capsys):
    said: list[str] = []
    plan = plan_device_map(SIZES, {"cpu": 1000}, warn=said.append)
    # cpu keeps room for the largest unit once something goes to disk: 700 B of units stay in RAM
    assert [plan[u] for u in SIZES] == ["cpu", "cpu", "cpu", "disk", "disk", "disk", "disk"]
    assert len(said) == 1 and "4 of 7 units (layers.2 on) are offloaded to disk" in said[0]
    assert plan_device_map(SIZES, {"cpu": 1000}) == plan  # default: one line on stderr
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("warning: max_memory cpu=1000 cannot hold the model")
    # named disk: planned for, no warning
    plan_device_map(SIZES, {"cpu": 1000, "disk": math.inf}, warn=said.append)
    assert len(said) == 1


def test_expert_plan_falls_back_to_disk_with_one_warning(tmp_path, capsys):
    from mobe_stream.checkpoint.reader import CheckpointReader
    from mobe_stream.runtime.config import parse_config
    from mobe_stream.runtime.model import plan_model
    from tests.test_runtime_experts import _resident

    path = make_tiny_moe(tmp_path / "m", "qwen3_moe", num_shards=2)
    with CheckpointReader(path) as r:
        cfg = parse_config(r.config, r.config_path)
        mem = f"cpu={_resident(path, torch.bfloat16) + 1}"  # the resident part only: no room for any expert
        plan, _ = plan_model(r, cfg, torch.bfloat16, "experts", mem)  # used to be ResourceError "add disk offload"
        assert {d for k, d in plan.items() if k.endswith(".experts")} == {"disk"}
        err = capsys.readouterr().err.splitlines()
        assert len(err) == 1 and err[0].startswith("warning: --device-map experts: max_memory") and "disk" in err[0]
        plan_model(r, cfg, torch.bfloat16, "experts", mem + ",disk")
        assert capsys.readouterr().err == ""


def test_json_device_map_runs_like_in_memory(tmp_path):
    src = make_tiny_moe(tmp_path / "m", "kimi_k2", fp8=True, layout="fused", num_shards=2)
    ref, ref_inc, _ = _run(src, dtype=torch.bfloat16)
    spec = _map_file(tmp_path, {"model": "cpu", "model.layers.1": "disk", "lm_head": "disk"})
    got, inc, plan = _run(src, dtype=torch.bfloat16, device_map=spec)
    assert plan == {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "cpu", "norm": "cpu", "lm_head": "disk"}
    assert torch.equal(got, ref) and torch.equal(inc, ref_inc)


def _stamps(folder):
    return {p.name: (p.stat().st_mtime_ns, p.stat().st_ino) for p in sorted(folder.iterdir())}


def test_offload_folder_keeps_converted_units_across_runs(tmp_path, capsys):
    """A bf16 checkpoint run in fp32 with its units on disk: the cast tensors are written once to
    --offload-folder (safetensors in the compute dtype + index.json), reused by the next run with the
    same checkpoint and dtype, rewritten with one warning when either changes."""
    from mobe_stream.checkpoint.safetensors_io import read_header

    src = make_tiny_moe(tmp_path / "m", "qwen3_moe", num_shards=2)  # stored bf16
    model_files = sorted(p.name for p in src.iterdir())
    ref, ref_inc, _ = _run(src, dtype=torch.float32)
    folder = tmp_path / "off"
    disk = dict(device_map="auto", max_memory="cpu=1,disk", offload_folder=folder)
    got, inc, plan = _run(src, dtype=torch.float32, **disk)
    assert torch.equal(got, ref) and torch.equal(inc, ref_inc)
    index = json.loads((folder / "index.json").read_text())
    assert index["format"] == "mobe-stream-offload/1" and index["dtype"] == "float32"
    assert index["fingerprint"]["digest"] and set(index["units"]) == set(plan)
    for unit, record in index["units"].items():
        header = read_header(folder / f"{unit}.safetensors")
        assert {e.dtype for e in header.tensors.values()} == {"F32"} and set(header.tensors) == set(record["tensors"])
    first = _stamps(folder)
    assert capsys.readouterr().err == ""

    got, _, _ = _run(src, dtype=torch.float32, **disk)  # same checkpoint, same dtype: reused, not rewritten
    assert torch.equal(got, ref) and _stamps(folder) == first and capsys.readouterr().err == ""

    _run(src, dtype=torch.float16, **disk)  # another dtype: rewritten, one line says why
    err = capsys.readouterr().err.splitlines()
    assert err == [f"warning: {folder}: offload files were written for dtype float32, not float16; rewriting them"]
    assert json.loads((folder / "index.json").read_text())["dtype"] == "float16"
    (folder / "layers.1.safetensors").unlink()  # a file lost: that unit alone is rewritten
    before = _stamps(folder)
    _run(src, dtype=torch.float16, **disk)
    after = _stamps(folder)
    assert "missing or not what index.json records" in capsys.readouterr().err
    assert [n for n in after if after[n] != before.get(n)] == ["index.json", "layers.1.safetensors"]

    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "note": "edited"}))  # the checkpoint changed
    got, _, _ = _run(src, dtype=torch.float16, **disk)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "another checkpoint or a changed one (config.json content differs)" in err
    assert sorted(p.name for p in src.iterdir()) == model_files  # nothing written into the model directory


def test_offload_folder_never_converts_fp8_and_never_writes_into_the_model(tmp_path):
    from mobe_stream.checkpoint.reader import CheckpointReader
    from mobe_stream.checkpoint.safetensors_io import read_header

    src = make_tiny_moe(tmp_path / "m", "deepseek_v3", fp8=True, num_shards=2)
    ref, _, _ = _run(src, dtype=torch.float32)
    folder = tmp_path / "off"
    got, _, _ = _run(src, dtype=torch.float32, device_map="auto", max_memory="cpu=1,disk", offload_folder=folder)
    assert torch.equal(got, ref)
    with CheckpointReader(src) as r:
        fp8_weights = {n for n in r.names() if r.scale_of(n) is not None}
        scales = {r.scale_of(n) for n in fp8_weights}
    written = {n for f in folder.glob("*.safetensors") for n in read_header(f).tensors}
    assert written and fp8_weights and not written & (fp8_weights | scales)  # FP8 stays as stored, with its scales
    for bad in (src, src / "off"):
        with pytest.raises(ConfigError, match="must not be or lie inside the model directory"):
            load_model(src, dtype=torch.float32, device_map="auto", max_memory="cpu=1,disk", offload_folder=bad)
    assert not (src / "off").exists()
    foreign = tmp_path / "accelerate_offload"
    foreign.mkdir()
    (foreign / "index.json").write_text('{"model.layers.0.mlp.gate.weight": {"dtype": "float32", "shape": [8, 64]}}')
    with pytest.raises(ConfigError, match="not a mobe-stream offload index"):
        load_model(src, dtype=torch.float32, device_map="auto", max_memory="cpu=1,disk", offload_folder=foreign)
    assert [p.name for p in foreign.iterdir()] == ["index.json"]
