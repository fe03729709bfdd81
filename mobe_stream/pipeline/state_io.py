"""Solver checkpoints: tensors as safetensors bytes plus JSON metadata, zstd-compressed.

No pickle anywhere: a checkpoint is data only, so a tampered file cannot run code on resume.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import safetensors.torch
import torch
import zstandard

from ..checkpoint.safetensors_io import atomic_write_bytes
from ..errors import CheckpointError

MAGIC = b"MOBESTATE1\n"


def save_state(path: Path, tensors: dict[str, torch.Tensor], meta: dict, level: int = 3) -> int:
    """Atomically write tensors+meta; returns bytes written."""
    raw = safetensors.torch.save(
        {k: v.detach().cpu().contiguous() for k, v in tensors.items()},
        metadata={"meta": json.dumps(meta, sort_keys=True)},
    )
    blob = MAGIC + zstandard.ZstdCompressor(level=level, threads=-1).compress(raw)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(path, blob)
    return len(blob)


def load_state(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    path = Path(path)
    try:
        blob = path.read_bytes()
        if not blob.startswith(MAGIC):
            raise ValueError("not a mobe-stream solver checkpoint")
        raw = zstandard.ZstdDecompressor().decompress(blob[len(MAGIC):])
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + n])
        meta = json.loads(header.get("__metadata__", {}).get("meta", "{}"))
        tensors = safetensors.torch.load(raw)
    except (OSError, ValueError, zstandard.ZstdError, struct.error, json.JSONDecodeError) as e:
        raise CheckpointError(f"unreadable solver checkpoint ({e}); delete it to restart this layer", path) from e
    return tensors, meta
