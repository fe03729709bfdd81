"""Token generation with a KV cache: greedy or sampled (temperature, top-k, top-p), streamed."""

from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import asdict, dataclass
from typing import TextIO

import torch

from ..errors import ConfigError
from .model import MoEModel
from .tokenizer import StreamDecoder, Tokenizer


@dataclass
class GenerationResult:
    text: str
    prompt_tokens: int
    new_tokens: int
    token_ids: list[int]
    stop_reason: str  # "eos" | "max_new_tokens"
    prefill_s: float
    decode_s: float
    tokens_per_s: float  # decode tokens / decode seconds (first token counted in prefill)
    peak_rss_bytes: int
    peak_gpu_bytes: int
    expert_cache: dict | None = None  # --device-map experts: this call's hits, misses, hit_rate, transfers
    mobe_cache: dict | None = None  # MoBE checkpoints: this call's mixed-basis cache hits, misses, hit_rate, bytes


    def as_dict(self) -> dict:
        return asdict(self)


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> int:
    """Next token from logits [V]: argmax at temperature 0, else sample after top-k / nucleus filtering."""
    if temperature <= 0:
        return int(logits.argmax())
    logits = logits.float() / temperature
    if top_k:
        kth = logits.topk(min(top_k, logits.numel())).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(descending=True)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix with mass >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = logits.softmax(-1).cpu()
    return int(torch.multinomial(probs, 1, generator=generator))


def check_sampling(max_new_tokens: int, temperature: float, top_k: int | None, top_p: float | None,
                   seed: int | None = None) -> None:
    """All sampling options judged before a weight is read; ConfigError (exit 2) names the option."""
    if max_new_tokens < 0:
        raise ConfigError(f"--max-new-tokens: must be >= 0, got {max_new_tokens}")
    if not math.isfinite(temperature) or temperature < 0:
        raise ConfigError(f"--temperature: must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and top_k < 1:
        raise ConfigError(f"--top-k: must be at least 1, got {top_k}")
    if top_p is not None and not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise ConfigError(f"--top-p: must lie in (0, 1], got {top_p!r}")
    if seed is not None and seed < 0:
        raise ConfigError(f"--seed: must be >= 0, got {seed}")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def generate(model: MoEModel, tok: Tokenizer, prompt: str | list[int], max_new_tokens: int = 32,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None, seed: int | None = None,
             stream: TextIO | None = sys.stdout) -> GenerationResult:
    """prompt: text, or ids already encoded (a rendered chat turn, encoded before any weight is read)."""
    ids = (tok.encode(prompt) if isinstance(prompt, str) else list(prompt)) or sorted(tok.eos_ids)[:1] or [0]
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    before, mixed_before = model.expert_stats(), model.mobe_cache_stats()
    cache = model.new_cache()
    dec = StreamDecoder(tok)
    out: list[int] = []
    stop = "max_new_tokens"
    t0 = time.perf_counter()
    logits = model(torch.tensor([ids]), cache)[0, -1]
    t1 = time.perf_counter()
    for step in range(max_new_tokens):
        nxt = sample_next(logits, temperature, top_k, top_p, gen)
        if nxt in tok.eos_ids:
            stop = "eos"
            break
        out.append(nxt)
        if stream is not None:
            stream.write(dec.push(nxt))
            stream.flush()
        if step + 1 < max_new_tokens:
            logits = model(torch.tensor([[nxt]]), cache)[0, -1]
    t2 = time.perf_counter()
    if stream is not None:
        stream.write("\n")
        stream.flush()
    decode_steps = max(len(out) - 1, 0)
    gpu = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else 0
    return GenerationResult(tok.decode(out), len(ids), len(out), out, stop, t1 - t0, t2 - t1,
                            decode_steps / (t2 - t1) if t2 > t1 and decode_steps else 0.0, peak_rss_bytes(), gpu,
                            _since(before, model.expert_stats()), _since(mixed_before, model.mobe_cache_stats()))


COUNTERS = ("hits", "misses", "evictions", "transfers", "transferred_bytes")


def _since(before: dict | None, after: dict | None) -> dict | None:
    """Expert-cache counters of one generate call (the model's counters run over its lifetime)."""
    if before is None or after is None:
        return None
    out = dict(after, **{k: after[k] - before[k] for k in COUNTERS if k in after})
    looked = out["hits"] + out["misses"]
    out["hit_rate"] = out["hits"] / looked if looked else 0.0
    return out
