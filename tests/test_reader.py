"""CheckpointReader and header validation: bit-exact reads, expert slices, and every refusal."""

from __future__ import annotations

import json
import os
import shutil
import struct
import time

import pytest
import torch
from safetensors.torch import save_file

from mobe_stream.checkpoint import fp8
from mobe_stream.checkpoint.fingerprint import SourceFingerprint
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.checkpoint.safetensors_io import read_header
from mobe_stream.errors import CheckpointError


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(_bits(a), _bits(b))


def _tensors() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return {
        "model.embed_tokens.weight": torch.randn(16, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.w.weight": torch.randn(300, 200, generator=g).to(fp8.FP8_DTYPE),
        "model.layers.0.w.weight_scale_inv": torch.rand(3, 2, generator=g) + 0.5,
        "model.layers.0.experts.gate_up_proj": torch.randn(4, 6, 8, generator=g).to(torch.bfloat16),
        "model.layers.0.mask": torch.tensor([True, False, True]),
        "model.layers.0.ids": torch.arange(7, dtype=torch.int64),
        "model.norm.weight": torch.randn(8, generator=g),
        "model.scalar": torch.tensor(2.5),
    }


@pytest.mark.parametrize("shards", [1, 3])
def test_reads_bit_exact(make_ckpt, shards):
    ts = _tensors()
    d = make_ckpt(ts, shards=shards)
    with CheckpointReader(d) as r:
        assert r.names() == list(ts)
        assert len(r.shards) == shards
        for name, t in ts.items():
            assert name in r
            info = r.info(name)
            assert info.shape == tuple(t.shape) and (d / info.shard).is_file()
            assert _same(r.get(name), t), name
        assert r.info("model.layers.0.w.weight").dtype == "F8_E4M3"
        assert r.info("model.embed_tokens.weight").dtype == "BF16"
        assert "nope" not in r
        assert r.get("model.norm.weight", torch.bfloat16).dtype == torch.bfloat16


def test_sharded_index_order_and_shard(make_ckpt):
    ts = _tensors()
    d = make_ckpt(ts, shards=2)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    with CheckpointReader(d) as r:
        assert r.names() == list(index["weight_map"])
        for name, shard in index["weight_map"].items():
            assert r.info(name).shard == shard


def test_get_expert_reads_one_slice(make_ckpt):
    ts = _tensors()
    d = make_ckpt(ts, shards=2)
    name = "model.layers.0.experts.gate_up_proj"
    with CheckpointReader(d) as r:
        for e in range(4):
            assert _same(r.get_expert(name, e), ts[name][e])
            assert torch.equal(r.get_expert(name, e, torch.float32), ts[name][e].float())
        with pytest.raises(CheckpointError, match="no expert slice 4"):
            r.get_expert(name, 4)


def test_fused_fp8_expert_dequantized_with_3d_scale(make_ckpt):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 260, 130, generator=g) * 0.05
    qs = [fp8.quantize(w[e]) for e in range(3)]
    q = torch.stack([a for a, _ in qs])
    s = torch.stack([b for _, b in qs])
    cfg = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "weight_block_size": [128, 128]}}
    d = make_ckpt({"x.down_proj": q, "x.down_proj_scale_inv": s}, cfg)
    with CheckpointReader(d) as r:
        assert r.fp8_block == (128, 128)
        for e in range(3):
            want = fp8.dequantize(q[e], s[e], (128, 128), torch.bfloat16)
            assert _same(r.get_expert("x.down_proj", e, torch.bfloat16), want)
            assert _same(r.get_expert("x.down_proj", e), q[e])
        full = r.get("x.down_proj", torch.float32)
        assert full.shape == (3, 260, 130)
        assert torch.equal(full[2], fp8.dequantize(q[2], s[2], (128, 128), torch.float32))


def test_missing_tensor_names_dir_and_tensor(make_ckpt):
    d = make_ckpt(_tensors())
    with CheckpointReader(d) as r:
        with pytest.raises(CheckpointError) as ei:
            r.get("model.layers.9.absent.weight")
    assert str(d) in str(ei.value) and "model.layers.9.absent.weight" in str(ei.value)


def test_fingerprint_stable_and_sensitive(make_ckpt):
    ts = _tensors()
    d = make_ckpt(ts, shards=2)
    with CheckpointReader(d) as r:
        fp = r.fingerprint()
    with CheckpointReader(d) as r:
        assert r.fingerprint() == fp
    ts["model.norm.weight"] = torch.zeros(9)  # different shape -> different header
    d2 = make_ckpt(ts, shards=2, name="other")
    with CheckpointReader(d2) as r:
        assert r.fingerprint() != fp


def test_fingerprint_tells_a_copy_from_a_remount(make_ckpt):
    d = make_ckpt(_tensors(), shards=2)
    with CheckpointReader(d) as r:
        fp = r.fingerprint()
    assert SourceFingerprint.from_json(json.loads(json.dumps(fp.to_json()))) == fp
    assert fp.files is not None
    # the same files seen through a remount: new inode/device numbers, same size and times
    remounted = {k: (*v[:3], v[3] + 1, v[4] + 1) for k, v in fp.files.items()}
    assert SourceFingerprint(fp.digest, fp.config_sha256, fp.index_sha256, remounted).changes_since(fp) == []
    # the same bytes copied over with their mtime (cp -a, rsync -a): unprovable without reading it all
    shard = sorted(d.glob("model-*.safetensors"))[1]
    time.sleep(0.05)  # let the kernel's coarse ctime clock tick past the previous write
    shutil.copy2(shard, d / "copy")
    os.replace(d / "copy", shard)
    with CheckpointReader(d) as r:
        changes = r.fingerprint().changes_since(fp)
    assert changes == [f"{shard.name} (a different file: replaced, copied or moved to another filesystem)"]


def test_reads_files_written_by_safetensors_library(tmp_path):
    ts = _tensors()
    save_file({k: v.contiguous() for k, v in ts.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text("{}")
    with CheckpointReader(tmp_path) as r:
        assert set(r.names()) == set(ts)
        assert all(_same(r.get(n), t) for n, t in ts.items())


# ---- header validation -------------------------------------------------------------------------

def _raw_shard(path, header: dict, data: bytes, length: int | None = None) -> None:
    body = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(body) if length is None else length) + body + data)


def _one(shape=(2, 2), dtype="F32", offsets=(0, 16)) -> dict:
    return {"t": {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}}


@pytest.mark.parametrize("header,data,length,match", [
    (None, b"", None, "shorter than the 8-byte header length"),
    (_one(), b"\0" * 16, 10**6, "truncated: header says it ends at"),
    (_one(), b"\0" * 10, None, "truncated: header says data ends at .* but file is"),
    (_one(offsets=(0, 10**9)), b"\0" * 16, None, "truncated: header says data ends at"),
    (_one(dtype="F4"), b"\0" * 16, None, "unknown dtype 'F4'"),
    (_one(offsets=(0, 12)), b"\0" * 12, None, "span 12 bytes but F32\\[2, 2\\] needs 16"),
    ({**_one(), "u": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, None, "overlaps"),
    ({"t": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}, b"\0" * 16, None, "unused bytes"),
    (_one(), b"\0" * 20, None, "4 unexpected trailing bytes"),
    ({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}}, b"\0" * 4, None, "invalid shape"),
])
def test_header_validation(tmp_path, header, data, length, match):
    p = tmp_path / "x.safetensors"
    if header is None:
        p.write_bytes(b"\1\2\3")
    else:
        _raw_shard(p, header, data, length)
    with pytest.raises(CheckpointError, match=match) as ei:
        read_header(p)
    assert str(p) in str(ei.value) and "\n" not in str(ei.value)


def test_header_corrupt_json(tmp_path):
    p = tmp_path / "x.safetensors"
    body = b'{"t": {"dtype": "F32", '
    p.write_bytes(struct.pack("<Q", len(body)) + body)
    with pytest.raises(CheckpointError, match="not valid JSON") as ei:
        read_header(p)
    assert str(p) in str(ei.value)


def test_truncated_shard_refused_on_open(make_ckpt):
    d = make_ckpt(_tensors(), shards=2)
    shard = d / "model-00002-of-00002.safetensors"
    size = shard.stat().st_size
    os.truncate(shard, size - 5)
    with pytest.raises(CheckpointError, match=f"data ends at {size} bytes but file is {size - 5} bytes") as ei:
        CheckpointReader(d)
    assert str(shard) in str(ei.value)


def test_header_offsets_past_file_size(make_ckpt):
    d = make_ckpt(_tensors())
    p = d / "model.safetensors"
    raw = p.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 1000
    header[last]["shape"] = [header[last]["data_offsets"][1] - header[last]["data_offsets"][0]]
    header[last]["dtype"] = "U8"
    _raw_shard(p, header, raw[8 + n:])
    with pytest.raises(CheckpointError, match="truncated: header says data ends at") as ei:
        CheckpointReader(d)
    assert str(p) in str(ei.value)


# ---- directory-level refusals ------------------------------------------------------------------

def _set_index(d, fn) -> None:
    p = d / "model.safetensors.index.json"
    doc = json.loads(p.read_text())
    fn(doc["weight_map"])
    p.write_text(json.dumps(doc))


@pytest.mark.parametrize("target", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors"])
def test_index_path_escaping_refused(make_ckpt, target):
    d = make_ckpt(_tensors(), shards=2)
    _set_index(d, lambda wm: wm.__setitem__("model.norm.weight", target))
    with pytest.raises(CheckpointError, match="outside the model directory") as ei:
        CheckpointReader(d)
    assert "model.safetensors.index.json" in str(ei.value)


def test_index_symlink_escaping_refused(make_ckpt, tmp_path):
    d = make_ckpt(_tensors(), shards=2)
    outside = tmp_path / "elsewhere.safetensors"
    (d / "model-00002-of-00002.safetensors").rename(outside)
    os.symlink(outside, d / "model-00002-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="resolves outside the model directory") as ei:
        CheckpointReader(d)
    assert "model.safetensors.index.json" in str(ei.value)


def test_missing_shard(make_ckpt):
    d = make_ckpt(_tensors(), shards=3)
    (d / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing") as ei:
        CheckpointReader(d)
    assert "model-00002-of-00003.safetensors" in str(ei.value)


def test_tensor_in_index_but_not_in_header(make_ckpt):
    d = make_ckpt(_tensors(), shards=2)
    _set_index(d, lambda wm: wm.__setitem__("model.ghost.weight", "model-00001-of-00002.safetensors"))
    with pytest.raises(CheckpointError, match="model.ghost.weight is listed in .* but not in the shard header") as ei:
        CheckpointReader(d)
    assert "model-00001-of-00002.safetensors" in str(ei.value)


def test_duplicate_tensor_across_shards(tmp_path):
    from mobe_stream.checkpoint.safetensors_io import write_safetensors

    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    write_safetensors(d / "a.safetensors", [("x", torch.zeros(2)), ("y", torch.ones(2))])
    write_safetensors(d / "b.safetensors", [("y", torch.ones(2))])
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}}))
    with pytest.raises(CheckpointError, match="duplicate tensor y: stored in two shards") as ei:
        CheckpointReader(d)
    assert "b.safetensors" in str(ei.value)


def test_pickle_only_dir_refused(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(CheckpointError, match="never unpickles.*convert .*safetensors") as ei:
        CheckpointReader(tmp_path)
    assert str(tmp_path) in str(ei.value) and "pytorch_model.bin" in str(ei.value)


def test_no_weights_at_all(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        CheckpointReader(tmp_path)


def test_config_missing_or_invalid(make_ckpt):
    d = make_ckpt(_tensors())
    (d / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON") as ei:
        CheckpointReader(d)
    assert str(d / "config.json") in str(ei.value)
    (d / "config.json").unlink()
    with pytest.raises(CheckpointError, match="missing") as ei:
        CheckpointReader(d)
    assert str(d / "config.json") in str(ei.value)


def test_not_a_directory(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        CheckpointReader(tmp_path / "nope")


@pytest.mark.parametrize("max_open,recycle", [(0, None), (1, 1), (1, None), (None, 64)])
def test_handle_cache_settings_keep_reads_exact(make_ckpt, max_open, recycle):
    ts = _tensors()
    d = make_ckpt(ts, shards=3)
    with CheckpointReader(d, max_open_shards=max_open, recycle_bytes=recycle) as r:
        for _ in range(2):
            for name, t in ts.items():
                assert _same(r.get(name), t), name
                assert len(r._handles) <= (len(r.shards) if max_open is None else max_open)
        assert _same(r.get_expert("model.layers.0.experts.gate_up_proj", 3), ts["model.layers.0.experts.gate_up_proj"][3])


def test_get_with_dtype_is_a_fresh_tensor(make_ckpt):
    ts = _tensors()
    d = make_ckpt(ts)
    with CheckpointReader(d) as r:
        r.get("model.norm.weight", torch.float32).add_(1.0)  # same dtype as stored: still a copy
        r.get_expert("model.layers.0.experts.gate_up_proj", 1, torch.bfloat16).add_(1.0)
        assert _same(r.get("model.norm.weight"), ts["model.norm.weight"])
        assert _same(r.get("model.layers.0.experts.gate_up_proj"), ts["model.layers.0.experts.gate_up_proj"])
        r.get("model.norm.weight").add_(1.0)  # raw views are private mappings: never reach the file
    with CheckpointReader(d) as r:
        assert _same(r.get("model.norm.weight"), ts["model.norm.weight"])


def test_shard_truncated_after_open_is_an_error_not_a_crash(make_ckpt):
    """A read through the mmap past the new end of a cut shard raises SIGBUS and kills Python; the
    reader checks the size first. (Reads from the still-intact start are refused first, so that
    without the check this test fails instead of killing pytest.)"""
    g = torch.Generator().manual_seed(0)
    ts = {"a": torch.randn(4096, generator=g), "fused": torch.randn(4, 64, 256, generator=g)}
    d = make_ckpt(ts)
    shard = d / "model.safetensors"
    size = shard.stat().st_size
    with CheckpointReader(d) as r:
        assert _same(r.get("a"), ts["a"])  # the handle (and its mmap) is open
        os.truncate(shard, size - 100_000)
        for read in (lambda: r.get("a"), lambda: r.get("fused"), lambda: r.get_expert("fused", 3),
                     lambda: r.get("fused", torch.bfloat16)):
            with pytest.raises(CheckpointError, match=rf"model\.safetensors: file shrank from {size} to "
                                                      rf"{size - 100_000} bytes during the run \(truncated"):
                read()
