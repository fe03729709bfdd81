"""Compress options, and the subset of them that decides the output (checked on resume)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
          "fp32": torch.float32, "float32": torch.float32}


@dataclass
class CompressOptions:
    method: str = "mobe"
    num_bases: int | None = None
    rank: int | None = None
    reduction: float | None = None
    activation: str = "silu"
    groups: int = 1
    solver: str = "adam"
    init: str = "clustered"
    steps: int = 1000
    lr: float = 0.07
    tol: float | None = None
    layers: str | None = None
    device: str = "auto"
    seed: int = 0
    dtype: str = "bf16"
    max_shard_size: str = "5GB"
    max_gpu_memory: str | None = None
    checkpoint_every: float = 300.0
    resume: bool = False
    overwrite: bool = False
    force: bool = False

    def output_dtype(self) -> torch.dtype:
        try:
            return DTYPES[self.dtype]
        except KeyError:
            raise ValueError(f"unknown --dtype {self.dtype!r}; use bf16, fp16 or fp32") from None

    def resolved_device(self) -> str:
        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        return self.device


def settings_for_journal(opts: CompressOptions, num_bases: int, rank: int, layers: list[int]) -> dict:
    """What determines the output tensors. Device, checkpoint cadence and memory caps do not."""
    return {
        "method": opts.method,
        "solver": opts.solver,
        "init": opts.init,
        "num_bases": num_bases,
        "rank": rank,
        "activation": opts.activation,
        "groups": opts.groups,
        "steps": opts.steps,
        "lr": opts.lr,
        "tol": opts.tol,
        "seed": opts.seed,
        "dtype": str(opts.output_dtype()).replace("torch.", ""),
        "layers": layers,
        "max_shard_size": opts.max_shard_size,
    }
