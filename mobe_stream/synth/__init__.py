"""Tiny synthetic checkpoints with each family's real config keys and tensor names (tests, demo, benchmarks)."""

from .make import FAMILIES, make_tiny_moe, make_wide_kimi

__all__ = ["FAMILIES", "make_tiny_moe", "make_wide_kimi"]
