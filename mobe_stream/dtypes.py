"""Dtype spellings as users type them (`--dtype` of every command): the one table, torch-free so the
CLI's help and option checks never import torch.

The spellings are torch's and transformers': torch's names (bfloat16, float16, float32), torch's
aliases (half, float) and the short forms of accelerate and the hub (bf16, fp16, fp32). `auto` is
the checkpoint's own dtype; what that means is the command's business (the runtime: config.json's
dtype; compress: the experts' storage dtype). FP8 (e4m3 with block scales, checkpoint/fp8.py) is a
storage dtype that only compress and export write, never a compute dtype.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .errors import ConfigError

if TYPE_CHECKING:
    import torch

AUTO = "auto"
# spelling -> torch's name
COMPUTE = {"bf16": "bfloat16", "bfloat16": "bfloat16",
           "fp16": "float16", "float16": "float16", "half": "float16",
           "fp32": "float32", "float32": "float32", "float": "float32"}
FP8 = {"fp8": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn"}
SHORT = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float8_e4m3fn": "fp8"}


def spellings(fp8: bool = False) -> tuple[str, ...]:
    """Every accepted spelling, `auto` first."""
    return (AUTO, *COMPUTE, *(FP8 if fp8 else ()))


def dtype_name(spelling: str, option: str = "--dtype", fp8: bool = False) -> str:
    """`auto`, or torch's name of the dtype a spelling means (case-insensitive); anything else is a
    one-line ConfigError listing the accepted spellings."""
    s = spelling.strip().lower() if isinstance(spelling, str) else spelling
    table = {**COMPUTE, **FP8} if fp8 else COMPUTE
    if s == AUTO:
        return AUTO
    if s not in table:
        raise ConfigError(f"unknown {option} {spelling!r}; choose one of: {', '.join(spellings(fp8))}")
    return table[s]


def to_torch(name: str) -> torch.dtype:
    """torch's dtype for a name or spelling (not `auto`)."""
    import torch

    return getattr(torch, dtype_name(name, fp8=True))


def dtype_key(dtype: torch.dtype | str) -> str:
    """A dtype as every JSON output and the config's mobe block spell it: torch's name without the
    module ("bfloat16", "float8_e4m3fn", "float32"); a name torch does not know passes through."""
    return str(dtype).removeprefix("torch.")


def short_name(dtype: torch.dtype | str) -> str:
    """bf16, fp16, fp32, fp8 for a dtype or any spelling of it."""
    return SHORT[dtype_name(dtype_key(dtype), fp8=True)]
