"""ShardWriter, streaming atomic shard writes, index + manifest, parse_size."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from mobe_stream.checkpoint import safetensors_io
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.checkpoint.safetensors_io import sha256_file, write_safetensors
from mobe_stream.checkpoint.writer import ShardRecord, ShardWriter, verify_manifest, write_index_and_manifest
from mobe_stream.errors import ConfigError
from mobe_stream.sizes import parse_size


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def test_write_safetensors_bit_exact_all_dtypes(tmp_path):
    g = torch.Generator().manual_seed(0)
    items = [
        ("f8", (torch.randn(33, 17, generator=g) * 10).to(torch.float8_e4m3fn)),
        ("bf16", torch.randn(5, 7, generator=g).to(torch.bfloat16)),
        ("f32", torch.randn(4, generator=g)),
        ("i64", torch.arange(-3, 9)),
        ("bool", torch.tensor([[True, False], [False, True]])),
        ("noncontig", torch.randn(6, 4, generator=g).t()),
        ("scalar", torch.tensor(1.25)),
        ("empty", torch.empty(0, 5)),
    ]
    path = tmp_path / "s.safetensors"
    sha, size = write_safetensors(path, items, {"format": "pt", "note": "x"})
    assert size == path.stat().st_size and sha == sha256_file(path)
    assert not list(tmp_path.glob("*.tmp-*"))
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata() == {"format": "pt", "note": "x"}
        for name, t in items:
            got = f.get_tensor(name)
            assert got.dtype == t.dtype and got.shape == t.shape
            assert torch.equal(_bits(got), _bits(t)), name


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    calls = []

    def boom(t):
        calls.append(1)
        if len(calls) == 2:
            raise OSError("disk full (simulated)")
        return real(t)

    real = safetensors_io._tensor_bytes
    monkeypatch.setattr(safetensors_io, "_tensor_bytes", boom)
    with pytest.raises(OSError):
        write_safetensors(path, [("a", torch.zeros(4)), ("b", torch.zeros(4))])
    assert list(tmp_path.iterdir()) == []


def _t(nbytes: int, fill: int = 0) -> torch.Tensor:
    return torch.full((nbytes,), fill, dtype=torch.uint8)


def test_shard_splitting_by_size(tmp_path):
    w = ShardWriter(tmp_path, max_shard_size=2500, start_index=3)
    for i in range(5):
        w.add(f"t{i}", _t(1000, i))
    w.add("big", _t(6000, 9))
    w.add("tail", _t(10, 7))
    assert w.pending_bytes == 11010
    recs = w.flush()
    assert w.pending_bytes == 0 and w.next_index == 3 + len(recs)
    assert [r.tensors for r in recs] == [["t0", "t1"], ["t2", "t3"], ["t4"], ["big"], ["tail"]]
    assert [r.filename for r in recs] == [f"model-{i:05d}.safetensors" for i in range(3, 8)]
    for r in recs:
        p = tmp_path / r.filename
        assert p.stat().st_size == r.size and sha256_file(p) == r.sha256
    assert not list(tmp_path.glob("*.tmp-*"))
    assert w.flush() == []


def test_duplicate_name_rejected_across_flushes(tmp_path):
    w = ShardWriter(tmp_path)
    w.add("a", torch.zeros(2))
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", torch.zeros(2))
    w.flush()
    with pytest.raises(ValueError, match="duplicate"):
        w.add("a", torch.zeros(2))


def test_index_manifest_and_roundtrip(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    g = torch.Generator().manual_seed(0)
    ts = {f"model.layers.{i}.w": torch.randn(64, 32, generator=g).to(torch.bfloat16) for i in range(6)}
    w = ShardWriter(tmp_path, max_shard_size=3 * 64 * 32 * 2, prefix="model")
    for n, t in ts.items():
        w.add(n, t)
    recs = w.flush()
    assert len(recs) == 2
    # records may come back as dicts (from the compress journal)
    write_index_and_manifest(tmp_path, [recs[0], recs[1]._asdict()], {"mobe_format_version": "1"})
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"] == {"total_size": 6 * 64 * 32 * 2, "mobe_format_version": "1"}
    assert index["weight_map"] == {n: ("model-00001.safetensors" if i < 3 else "model-00002.safetensors")
                                   for i, n in enumerate(ts)}
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["format"] == "mobe-stream-manifest/1"
    for r in recs:
        assert manifest["shards"][r.filename] == {"sha256": sha256_file(tmp_path / r.filename),
                                                  "size": r.size, "tensors": r.tensors}
    assert not list(tmp_path.glob("*.tmp-*"))
    assert verify_manifest(tmp_path) == []
    with CheckpointReader(tmp_path) as r:
        assert r.names() == list(ts)
        assert all(torch.equal(r.get(n), t) for n, t in ts.items())


def test_verify_manifest_finds_problems(tmp_path):
    w = ShardWriter(tmp_path, max_shard_size=100)
    for i in range(3):
        w.add(f"t{i}", _t(100, i))
    recs = w.flush()
    write_index_and_manifest(tmp_path, recs)
    (tmp_path / recs[0].filename).unlink()
    p1 = tmp_path / recs[1].filename
    data = bytearray(p1.read_bytes())
    data[-1] ^= 0xFF  # same size, different content
    p1.write_bytes(bytes(data))
    with open(tmp_path / recs[2].filename, "ab") as f:
        f.write(b"x")
    problems = verify_manifest(tmp_path)
    assert len(problems) == 3
    assert "missing" in problems[0] and recs[0].filename in problems[0]
    assert "sha256" in problems[1] and recs[1].filename in problems[1]
    assert "size" in problems[2] and recs[2].filename in problems[2]
    assert len(verify_manifest(tmp_path, full=False)) == 2  # size-only check misses the flipped byte


def test_verify_manifest_missing_manifest(tmp_path):
    assert "missing" in verify_manifest(tmp_path)[0]


def test_record_is_namedtuple():
    r = ShardRecord("model-00001.safetensors", "ab", 3, ["x"])
    assert r._asdict() == {"filename": "model-00001.safetensors", "sha256": "ab", "size": 3, "tensors": ["x"]}


@pytest.mark.parametrize("text,value", [
    ("5GB", 5 * 10**9), ("20GiB", 20 * 2**30), ("500MB", 500 * 10**6), ("3MiB", 3 * 2**20),
    ("10KB", 10**4), ("10KiB", 10 * 2**10), ("1TB", 10**12), ("123", 123), (4096, 4096),
    ("1.5GB", 1_500_000_000), ("64B", 64), (" 2 GiB ", 2 * 2**30),
])
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize("text", ["", "GB", "5XB", "-1GB", "five", "0", "1e9", 0, -5])
def test_parse_size_rejects(text):
    with pytest.raises(ConfigError):
        parse_size(text)


def test_injected_enospc_leaves_no_partial_shard(tmp_path, monkeypatch):
    from mobe_stream import faults

    monkeypatch.setenv("MOBE_STREAM_FAULT", "enospc_after_bytes=1500")
    monkeypatch.setattr(faults, "_written", 0)
    w = ShardWriter(tmp_path, max_shard_size=1000)
    for i in range(4):
        w.add(f"t{i}", _t(1000, i))
    with pytest.raises(OSError) as ei:
        w.flush()
    assert ei.value.errno == 28
    assert [p.name for p in tmp_path.iterdir()] == ["model-00001.safetensors"]  # complete shard only
