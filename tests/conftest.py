"""Shared fixtures: a tiny hand-built checkpoint directory (independent of mobe_stream.synth)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from mobe_stream.checkpoint.safetensors_io import write_safetensors


def build_checkpoint(path: Path, tensors: dict[str, torch.Tensor], config: dict | None = None,
                     shards: int = 1) -> Path:
    """config.json + model.safetensors (shards=1) or N indexed shards, tensors split in order."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config if config is not None else {"model_type": "qwen3_moe"}))
    items = list(tensors.items())
    if shards == 1:
        write_safetensors(path / "model.safetensors", items, {"format": "pt"})
        return path
    per = -(-len(items) // shards)
    weight_map = {}
    for k in range(shards):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        part = items[k * per:(k + 1) * per]
        write_safetensors(path / fname, part, {"format": "pt"})
        weight_map.update({n: fname for n, _ in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def make_ckpt(tmp_path):
    """make_ckpt(tensors, config=None, shards=1, name="ckpt") -> model dir under tmp_path."""
    def make(tensors: dict[str, torch.Tensor], config: dict | None = None, shards: int = 1,
             name: str = "ckpt") -> Path:
        return build_checkpoint(tmp_path / name, tensors, config, shards)
    return make
