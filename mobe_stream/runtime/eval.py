"""Perplexity over non-overlapping windows (each window scored on its own, no carried context)."""

from __future__ import annotations

import math
import time

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .model import MoEModel
from .tokenizer import Tokenizer


def perplexity(model: MoEModel, tok: Tokenizer, text: str, ctx: int = 512, progress=None) -> dict:
    """Perplexity over consecutive windows of `ctx` tokens. progress(done_windows, total_windows) is
    called after each window (the CLI draws a bar, or a heartbeat line when piped)."""
    if ctx < 2:
        raise ConfigError(f"--ctx must be at least 2, got {ctx}")
    ids = tok.encode(text)
    total = sum(1 for s in range(0, len(ids), ctx) if len(ids) - s >= 2)
    if len(ids) < 2:
        raise ConfigError("text is too short to evaluate (needs at least 2 tokens)")
    nll, count, windows = 0.0, 0, 0
    t0 = time.perf_counter()
    for s in range(0, len(ids), ctx):
        w = ids[s:s + ctx]
        if len(w) < 2:
            break
        logits = model(torch.tensor([w]))[0]
        nll += F.cross_entropy(logits[:-1].float(), torch.tensor(w[1:], device=logits.device), reduction="sum").item()
        count += len(w) - 1
        windows += 1
        if progress is not None:
            progress(windows, total)
    secs = time.perf_counter() - t0
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows, "ctx": ctx,
            "seconds": secs, "tokens_per_s": count / secs if secs else 0.0, "mobe_cache": model.mobe_cache_stats()}
