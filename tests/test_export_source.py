"""export judges its source and its output disk before writing: a corrupt source shard is refused
(not laundered into a fresh manifest), a disk too small is refused, side files are streamed."""

from __future__ import annotations

import hashlib
import json
import shutil
import tracemalloc

import pytest

from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.errors import ResourceError
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.events import Reporter, Sink
from mobe_stream.pipeline.export import ExportOptions, export
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.synth import make_tiny_moe

from .helpers import run_cli

FAST = dict(num_bases=4, rank=16, steps=5, checkpoint_every=1e9)


@pytest.fixture
def mobe(tmp_path):
    src = make_tiny_moe(tmp_path / "src")
    out = tmp_path / "mobe"
    compress(src, out, CompressOptions(**FAST))
    return out


class _Events(Sink):
    def __init__(self):
        self.seen: list[tuple[str, dict]] = []

    def event(self, kind, fields):
        self.seen.append((kind, fields))


def test_export_refuses_corrupt_source_shard(tmp_path, mobe):
    name = "model.layers.1.mlp.experts.gate_proj.mobe_A"
    with CheckpointReader(mobe) as r:
        info = r.info(name)
    shard = mobe / info.shard
    with open(shard, "r+b") as f:  # flip one bit inside the tensor's data: same size, still finite
        f.seek(info.offset)
        byte = f.read(1)
        f.seek(info.offset)
        f.write(bytes([byte[0] ^ 1]))
    out = tmp_path / "exported"
    proc = run_cli("export", str(mobe), "--out", str(out), "--quiet")
    assert proc.returncode == 2, proc
    lines = proc.stderr.strip().splitlines()
    assert lines[-1] == (f"error: {shard}: sha256 differs from manifest.json; the source is corrupt "
                         f"(run mobe-stream verify)")
    assert not (out / "model.safetensors.index.json").exists() and not (out / "manifest.json").exists()


def test_export_without_source_manifest_warns_once_and_exports(tmp_path, mobe):
    (mobe / "manifest.json").unlink()
    sink = _Events()
    export(mobe, tmp_path / "exported", ExportOptions(), Reporter([sink]))
    warnings = [f["text"] for k, f in sink.seen if k == "warning"]
    assert len(warnings) == 1 and "manifest.json: missing" in warnings[0] and "not checked" in warnings[0]
    assert (tmp_path / "exported" / "manifest.json").exists()


def test_export_refuses_when_disk_too_small(tmp_path, mobe, monkeypatch):
    real = shutil.disk_usage

    def small(path):
        u = real(path)
        return type(u)(u.total, u.total - 4096, 4096)

    monkeypatch.setattr(shutil, "disk_usage", small)
    out = tmp_path / "exported"
    with pytest.raises(ResourceError, match=r"output needs about .* GB more but only 0\.00 GB is free; free space or "
                                            r"choose another --out"):
        export(mobe, out, ExportOptions())
    assert list(out.iterdir()) == []  # the lock is gone, no journal, no shard


def test_export_streams_a_large_side_file(tmp_path, mobe):
    big = mobe / "big_side_file.dat"
    with open(big, "wb") as f:  # 64 MiB, sparse, with a few bytes that must survive the copy
        f.truncate(64 * 2**20)
        for pos in (0, 20 * 2**20 + 7, 64 * 2**20 - 1):
            f.seek(pos)
            f.write(b"\xa5")
    out = tmp_path / "exported"
    tracemalloc.start()
    try:
        export(mobe, out, ExportOptions())
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert hashlib.sha256((out / big.name).read_bytes()).hexdigest() == hashlib.sha256(big.read_bytes()).hexdigest()
    assert peak < 40 * 2**20, f"export held {peak / 2**20:.0f} MiB of Python objects: the side file was read whole"
    assert json.loads((out / "mobe-journal.json").read_text())["complete"] is True
