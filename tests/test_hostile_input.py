"""Broken or hostile checkpoints: exit code 2, one line naming the file and the problem, nothing written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobe_stream.synth import make_tiny_moe

from .helpers import dir_digest, run_cli


def _index(src: Path) -> dict:
    return json.loads((src / "model.safetensors.index.json").read_text())


def _shards(src: Path) -> list[Path]:
    return sorted(src.glob("*.safetensors"))


def truncate_shard(src):
    s = _shards(src)[1]
    s.write_bytes(s.read_bytes()[: s.stat().st_size // 2])
    return s.name


def header_offsets_past_end(src):
    s = _shards(src)[0]
    raw = s.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    begin, end = header[last]["data_offsets"]
    header[last]["data_offsets"] = [begin, end + 4096]  # claims more data than the file holds
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    s.write_bytes(struct.pack("<Q", len(text)) + text + raw[8 + n :])
    return s.name


def index_escapes_dir(src):
    idx = _index(src)
    name = next(iter(idx["weight_map"]))
    idx["weight_map"][name] = "../outside.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(idx))
    return "model.safetensors.index.json"


def missing_shard(src):
    s = _shards(src)[-1]
    s.unlink()
    return s.name


def duplicate_tensor(src):
    a, b = _shards(src)[0], _shards(src)[1]
    ta, tb = load_file(a), load_file(b)
    dup = next(iter(ta))
    tb[dup] = ta[dup].clone()
    save_file(tb, b, metadata={"format": "pt"})
    return dup


def shapes_disagree_with_config(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["moe_intermediate_size"] += 8
    (src / "config.json").write_text(json.dumps(cfg))
    return "config implies"


def unsupported_dtype(src):
    idx = _index(src)["weight_map"]
    name = next(n for n in idx if ".experts.0.gate_proj.weight" in n)
    path = src / idx[name]
    t = load_file(path)
    t[name] = torch.zeros_like(t[name], dtype=torch.int8)
    save_file(t, path, metadata={"format": "pt"})
    return "I8"


def pickle_only(src):
    for s in _shards(src):
        s.unlink()
    (src / "model.safetensors.index.json").unlink()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    return "pytorch_model.bin"


def unsupported_family(src):
    cfg = json.loads((src / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (src / "config.json").write_text(json.dumps(cfg))
    return "qwen3_moe"


CASES = [
    (truncate_shard, r"truncat|shorter|past the end|ends at"),
    (header_offsets_past_end, r"offset|past the end|ends at|file is"),
    (index_escapes_dir, r"outside"),
    (missing_shard, r"missing|not found|does not exist"),
    (duplicate_tensor, r"duplicate|more than one|twice|both"),
    (shapes_disagree_with_config, r"shape"),
    (unsupported_dtype, r"unsupported dtype"),
    (pickle_only, r"pickle|unpickl"),
    (unsupported_family, r"unsupported model family"),
]


@pytest.mark.parametrize("mutate,pattern", CASES, ids=[c[0].__name__ for c in CASES])
def test_bad_source_is_refused_cleanly(tmp_path, mutate, pattern):
    import re

    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    named = mutate(src)
    before = dir_digest(src)
    out = tmp_path / "out"
    proc = run_cli("compress", str(src), "--out", str(out), "--steps", "2", "--quiet")
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert re.search(pattern, lines[0], re.I), lines[0]
    assert str(src) in lines[0] or named in lines[0], lines[0]
    assert not out.exists() or not any(out.iterdir())
    assert dir_digest(src) == before
    assert "Traceback" not in run_cli("inspect", str(src)).stderr
