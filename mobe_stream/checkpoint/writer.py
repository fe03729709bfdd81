"""ShardWriter: size-capped safetensors shards written atomically, plus the index and manifest.

Shards are the unit of crash safety: each one is complete and fsynced (tmp + rename) before its
record is returned, and the index + manifest are written last, so a directory with a manifest is
a finished checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import NamedTuple

import torch

from ..errors import CheckpointError, ConfigError
from .safetensors_io import atomic_write_json, read_header, sha256_file, write_safetensors

INDEX_NAME = "model.safetensors.index.json"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = "mobe-stream-manifest/1"
SHARD_METADATA = {"format": "pt"}  # what transformers expects in a shard's __metadata__


class ShardRecord(NamedTuple):
    filename: str
    sha256: str
    size: int
    tensors: list[str]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class ShardWriter:
    """Collects tensors (by reference) and writes them to `prefix-NNNNN.safetensors` on flush()."""

    def __init__(self, out_dir: str | os.PathLike, max_shard_size: int = 5 * 10**9, prefix: str = "model",
                 start_index: int = 1):
        if max_shard_size <= 0:
            raise ConfigError(f"max shard size must be positive, got {max_shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.max_shard_size = int(max_shard_size)
        self.prefix = prefix
        self.next_index = int(start_index)
        self._pending: list[tuple[str, torch.Tensor]] = []
        self._seen: set[str] = set()
        self.pending_bytes = 0

    def add(self, name: str, tensor: torch.Tensor) -> None:
        """Queue a tensor; nothing is copied (it may be a view into a source mmap)."""
        if name in self._seen:
            raise ValueError(f"duplicate tensor name {name!r} in one ShardWriter")
        self._seen.add(name)
        self._pending.append((name, tensor))
        self.pending_bytes += _nbytes(tensor)

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{index:05d}.safetensors"

    def _groups(self) -> list[list[tuple[str, torch.Tensor]]]:
        """Greedy split in add order; a tensor bigger than the cap gets a shard of its own."""
        groups: list[list[tuple[str, torch.Tensor]]] = []
        size = 0
        for item in self._pending:
            nb = _nbytes(item[1])
            if not groups or (groups[-1] and size + nb > self.max_shard_size):
                groups.append([])
                size = 0
            groups[-1].append(item)
            size += nb
        return groups

    def flush(self) -> list[ShardRecord]:
        """Write everything pending; returns one record per shard, in order."""
        groups = self._groups()
        self._pending = []
        self.pending_bytes = 0
        records = []
        while groups:
            group = groups.pop(0)
            fname = self.shard_name(self.next_index)
            sha, size = write_safetensors(self.out_dir / fname, group, SHARD_METADATA)
            self.next_index += 1
            records.append(ShardRecord(fname, sha, size, [n for n, _ in group]))
            del group  # release tensor references as soon as their shard is on disk
        return records


def _as_record(rec: ShardRecord | Mapping) -> ShardRecord:
    """Accept ShardRecords or their dict form (as stored in the compress journal)."""
    if isinstance(rec, ShardRecord):
        return rec
    return ShardRecord(rec["filename"], rec["sha256"], int(rec["size"]), list(rec["tensors"]))


def write_index_and_manifest(out_dir: str | os.PathLike, records: Iterable[ShardRecord | Mapping],
                             metadata: Mapping[str, object] | None = None) -> None:
    """Write model.safetensors.index.json then manifest.json, both atomically.

    `total_size` is the sum of tensor data bytes (the Hugging Face convention), read from the
    headers of the shards on disk, which also checks the records name real tensors.
    """
    out_dir = Path(out_dir)
    recs = [_as_record(r) for r in records]
    weight_map: dict[str, str] = {}
    total = 0
    for rec in recs:
        header = read_header(out_dir / rec.filename)
        total += header.data_bytes
        for name in rec.tensors:
            if name not in header.tensors:
                raise CheckpointError(f"shard record lists tensor {name}, which the shard lacks", out_dir / rec.filename)
            if name in weight_map:
                raise CheckpointError(f"duplicate tensor {name}: recorded in {weight_map[name]} and {rec.filename}",
                                      out_dir / rec.filename)
            weight_map[name] = rec.filename
    meta = {"total_size": total, **(dict(metadata) if metadata else {})}
    atomic_write_json(out_dir / INDEX_NAME, {"metadata": meta, "weight_map": weight_map})
    shards = {r.filename: {"sha256": r.sha256, "size": r.size, "tensors": list(r.tensors)} for r in recs}
    atomic_write_json(out_dir / MANIFEST_NAME, {"format": MANIFEST_FORMAT, "shards": shards})


def read_manifest(out_dir: str | os.PathLike) -> dict | None:
    """manifest.json's shard records (filename -> {"sha256", "size", "tensors"}); None when there is
    no manifest.json (a checkpoint mobe-stream did not write). Unreadable: CheckpointError."""
    path = Path(out_dir) / MANIFEST_NAME
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"unreadable manifest ({e})", path) from None
    fmt = doc.get("format") if isinstance(doc, dict) else None
    if fmt != MANIFEST_FORMAT:
        raise CheckpointError(f"unknown manifest format {fmt!r}", path)
    if not isinstance(doc.get("shards"), dict):
        raise CheckpointError("unreadable manifest (no 'shards' object)", path)
    return doc["shards"]


def shard_problem(path: Path, record: object, full: bool) -> str | None:
    """What is wrong with one shard against its manifest record (None: intact). full=False compares
    the size only; full=True also hashes the whole file (one sequential read)."""
    if not isinstance(record, dict):
        return f"malformed record in {MANIFEST_NAME}"
    if not path.is_file():
        return f"shard listed in {MANIFEST_NAME} is missing"
    size = path.stat().st_size
    if size != record.get("size"):
        return f"size {size} differs from {MANIFEST_NAME} ({record.get('size')})"
    if full and sha256_file(path) != record.get("sha256"):
        return f"sha256 differs from {MANIFEST_NAME}"
    return None


def verify_manifest(out_dir: str | os.PathLike, full: bool = True) -> list[str]:
    """Problems with the shards listed in manifest.json (empty list: all present and intact).

    full=False checks sizes only (fast); full=True also re-hashes every shard.
    """
    out_dir = Path(out_dir)
    try:
        shards = read_manifest(out_dir)
    except CheckpointError as e:
        return [str(e)]
    if shards is None:
        return [f"{out_dir / MANIFEST_NAME}: missing"]
    problems = []
    for fname, rec in sorted(shards.items()):
        problem = shard_problem(out_dir / fname, rec, full)
        if problem:
            problems.append(f"{out_dir / fname}: {problem}")
    return problems
