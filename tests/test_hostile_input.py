"""Broken or hostile checkpoints: exit code 2, one line naming the file and the problem, nothing written."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobe_stream.synth import make_tiny_moe

from .helpers import dir_digest, run_cli, tiny_source_and_mobe


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


# ---- a bad --out, --log-json or journal: the same contract for compress and export -----------------
# Each case prepares tmp_path and returns (out, extra args, the path the message must name, pattern).

def out_is_a_file(tmp_path, ro):
    out = tmp_path / "out"
    out.write_text("not a directory\n")
    return out, [], out, r"not a directory"


def out_on_read_only_fs(tmp_path, ro):
    return ro() / "out", [], ro() / "out", r"cannot write|read-only"


def log_json_is_a_directory(tmp_path, ro):
    log = tmp_path / "logs"
    log.mkdir()
    return tmp_path / "out", ["--log-json", str(log)], log, r"log-json.*directory"


def log_json_in_missing_dir(tmp_path, ro):
    log = tmp_path / "no-such-dir" / "log.jsonl"
    return tmp_path / "out", ["--log-json", str(log)], log, r"log-json"


def log_json_on_read_only_fs(tmp_path, ro):
    log = ro() / "log.jsonl"
    return tmp_path / "out", ["--log-json", str(log)], log, r"log-json.*read-only"


def _journal(name, text):
    def case(tmp_path, ro):
        out = tmp_path / "out"
        out.mkdir()
        (out / "mobe-journal.json").write_text(text)
        return out, ["--resume"], out / "mobe-journal.json", r"not a mobe-stream journal \(.+\)"
    case.__name__ = name
    return case


_HEAD = '"format": "mobe-stream-journal/1", "settings": {}, "source_fingerprint": "x"'
journal_is_a_list = _journal("journal_is_a_list", "[]")
journal_without_settings = _journal("journal_without_settings", '{"format": "mobe-stream-journal/1", "units": {}}')
journal_without_units = _journal("journal_without_units", "{" + _HEAD + "}")
journal_with_wrong_types = _journal("journal_with_wrong_types",
                                    '{' + _HEAD + ', "units": [], "next_shard_index": "1", "complete": false}')
journal_unit_without_shards = _journal("journal_unit_without_shards",
                                       '{' + _HEAD + ', "units": {"globals": {}}, "next_shard_index": 1, "complete": false}')

OUT_CASES = [out_is_a_file, out_on_read_only_fs, log_json_is_a_directory, log_json_in_missing_dir,
             log_json_on_read_only_fs, journal_is_a_list, journal_without_settings, journal_without_units,
             journal_with_wrong_types, journal_unit_without_shards]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny source and its MoBE compression, shared by the cases (neither is ever modified)."""
    return tiny_source_and_mobe(tmp_path_factory.mktemp("models"))


@pytest.fixture
def ro(tmp_path):
    """ro() -> a directory on a read-only tmpfs (root can write through chmod, not through a ro mount)."""
    import os
    import subprocess

    mounted = []

    def get() -> Path:
        path = tmp_path / "ro"
        if not mounted:
            path.mkdir()
            if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)],
                                                   capture_output=True, check=False).returncode != 0:
                pytest.skip("needs root and mount to make a read-only filesystem (chmod does not stop root)")
            mounted.append(path)
        return path

    yield get
    for path in mounted:
        subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.parametrize("command", ["compress", "export"])
@pytest.mark.parametrize("case", OUT_CASES, ids=[c.__name__ for c in OUT_CASES])
def test_bad_output_is_refused_cleanly(tmp_path, models, ro, command, case):
    import re

    out, extra, named, pattern = case(tmp_path, ro)
    before = dir_digest(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    fast = ["--num-bases", "4", "--rank", "16", "--steps", "5"] if command == "compress" else []
    proc = run_cli(command, str(models[command]), "--out", str(out), *fast, "--quiet", *extra)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert str(named) in lines[0] and re.search(pattern, lines[0], re.IGNORECASE), lines[0]
    after = dir_digest(out) if out.is_dir() else (out.read_bytes() if out.exists() else None)
    assert after == before, "nothing may be written to --out"
    assert not (out / ".mobe-stream.lock").exists()
