"""Tiny synthetic checkpoints with each family's real config keys and tensor names (tests, demo, benchmarks)."""

from .make import FAMILIES, TOKENIZERS, make_tiny_moe, make_wide_kimi

__all__ = ["FAMILIES", "TOKENIZERS", "make_tiny_moe", "make_wide_kimi"]
