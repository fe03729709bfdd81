"""Perplexity over non-overlapping windows (each window scored on its own, no carried context), and
the same windows scored against a reference model: KL(P_ref || P_model) and top-1 agreement."""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.reader import CheckpointReader
from ..errors import ConfigError
from .config import parse_config
from .model import MoEModel
from .tokenizer import Tokenizer


def _ids(tok: Tokenizer, text: str, ctx: int) -> list[int]:
    if ctx < 2:
        raise ConfigError(f"--ctx must be at least 2, got {ctx}")
    ids = tok.encode(text)
    if len(ids) < 2:
        raise ConfigError("text is too short to evaluate (needs at least 2 tokens)")
    return ids


def _windows(models: Sequence[MoEModel], ids: list[int], ctx: int,
             progress=None) -> Iterator[tuple[torch.Tensor, list[torch.Tensor]]]:
    """(targets [n], each model's logits [n, V] at the n predicted positions) per window of `ctx`
    tokens, on the first model's logits device; a last window of one token (nothing to predict) is
    dropped. Only one window's logits are alive at a time. progress(done, total) after each window."""
    starts = [s for s in range(0, len(ids), ctx) if len(ids) - s >= 2]
    for k, s in enumerate(starts, 1):
        w = ids[s:s + ctx]
        first = models[0](torch.tensor([w]))[0, :-1]
        logits = [first] + [m(torch.tensor([w]))[0, :-1].to(first.device) for m in models[1:]]
        yield torch.tensor(w[1:], device=first.device), logits
        if progress is not None:
            progress(k, len(starts))


def _summary(model: MoEModel, nll: float, count: int, windows: int, ctx: int, secs: float) -> dict:
    return {"perplexity": math.exp(nll / count), "nll": nll / count, "tokens": count, "windows": windows, "ctx": ctx,
            "seconds": secs, "tokens_per_s": count / secs if secs else 0.0, "mobe_cache": model.mobe_cache_stats()}


def perplexity(model: MoEModel, tok: Tokenizer, text: str, ctx: int = 512, progress=None) -> dict:
    """Perplexity over consecutive windows of `ctx` tokens. progress(done_windows, total_windows) is
    called after each window (the CLI draws a bar, or a heartbeat line when piped)."""
    ids = _ids(tok, text, ctx)
    nll, count, windows = 0.0, 0, 0
    t0 = time.perf_counter()
    for targets, (logits,) in _windows([model], ids, ctx, progress):
        nll += F.cross_entropy(logits, targets, reduction="sum").item()
        count += len(targets)
        windows += 1
    return _summary(model, nll, count, windows, ctx, time.perf_counter() - t0)


def check_reference(tok: Tokenizer, ref_tok: Tokenizer, text: str) -> None:
    """Refuse, before any weight is read, a reference whose tokenizer reads `text` as other ids or
    whose model has another vocabulary: its logits would score other tokens, and KL / agreement
    between the two would mean nothing."""
    if tok.encode(text) != ref_tok.encode(text):
        raise ConfigError(f"{tok.model_dir} and reference {ref_tok.model_dir} tokenize the text differently; "
                          "--reference needs the same tokenizer")
    sizes = [_vocab_size(t.model_dir) for t in (tok, ref_tok)]
    if sizes[0] != sizes[1]:
        raise ConfigError(f"{tok.model_dir} has a vocabulary of {sizes[0]}, reference {ref_tok.model_dir} {sizes[1]}; "
                          "--reference needs the same vocabulary")


def _vocab_size(model_dir: Path) -> int:
    with CheckpointReader(model_dir) as reader:
        return parse_config(reader.config, reader.config_path).vocab_size


def compare(model: MoEModel, reference: MoEModel, tok: Tokenizer, text: str, ctx: int = 512, progress=None) -> dict:
    """perplexity()'s result for `model` plus, over the same windows, the reference's perplexity, the
    mean per-token KL(P_reference || P_model) in nats and the fraction of positions where both
    models' argmax agree. Both models run each window before the next one.
    The two must share tokenizer and vocabulary (check_reference)."""
    ids = _ids(tok, text, ctx)
    nll = ref_nll = kl = 0.0
    agree = count = windows = 0
    t0 = time.perf_counter()
    for targets, (logits, ref_logits) in _windows([model, reference], ids, ctx, progress):
        logp, ref_logp = F.log_softmax(logits, -1), F.log_softmax(ref_logits, -1)  # forward's logits are fp32
        nll += F.nll_loss(logp, targets, reduction="sum").item()
        ref_nll += F.nll_loss(ref_logp, targets, reduction="sum").item()
        kl += F.kl_div(logp, ref_logp, reduction="sum", log_target=True).item()
        agree += int((logits.argmax(-1) == ref_logits.argmax(-1)).sum())
        count += len(targets)
        windows += 1
    r = _summary(model, nll, count, windows, ctx, time.perf_counter() - t0)
    return {**r, "reference_perplexity": math.exp(ref_nll / count), "kl": kl / count, "top1_agreement": agree / count}
