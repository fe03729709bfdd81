"""The calibration forward: calibration text through the ORIGINAL model, layer by layer, handing
each MoE layer's routed inputs to the caller (pipeline/calib.py turns them into input metrics).

Layer-major, not token-major: every window's hidden state is kept (n tokens x hidden, in the
compute dtype: Kimi-K2 at 128k tokens 1.9 GB in bf16) and one decoder layer is read at a time
from the source shards (all units are "disk" units of a WeightStore: nothing else is resident,
the next layer is prefetched while this one computes). Each layer is read once for all windows.

Inputs of layer k+1 come from the original layer k, not a compressed one: every projection's
statistics are then known before any fit starts, the fits stay independent units (resumable,
shareable between torchrun ranks in any order), and one forward serves every layer. GPTQ-style
sequential calibration (feeding each layer the already-compressed model's activations) would
chain the fits of all 60 layers into one sequence and need a second forward per layer.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from ..checkpoint.reader import CheckpointReader
from ..errors import ConfigError
from ..pipeline.calib import CalibRuntime
from .cache import causal_mask
from .config import parse_config
from .device_map import Device
from .model import MoEModel, resolve_dtype
from .offload import WeightStore
from .tokenizer import Tokenizer
from .weights import unit_names

WINDOW_TOKENS = 8192  # tokens per forward batch (windows of ctx tokens stacked)

# on_layer(layer, hidden [windows, ctx, d], routed inputs [n, d] or None, experts [n, top_k] or None,
#          input scales [n, top_k] or None: the routing weights where they scale the experts' inputs)
OnLayer = Callable[[int, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None], None]


def calibration_windows(model_dir: Path, text_path: Path, tokens: int, ctx: int) -> torch.Tensor:
    """[windows, ctx] token ids: the first `tokens` tokens of the text in whole windows of `ctx`
    (`ctx` capped at the model's max_position_embeddings; a shorter tail is dropped)."""
    reader = CheckpointReader(model_dir)
    try:
        cfg = parse_config(reader.config, reader.config_path)
        tok = Tokenizer(model_dir, reader.config)
    finally:
        reader.close()
    try:
        text = text_path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:
        raise ConfigError(f"--calib: cannot read {text_path}: {e.strerror or e}") from None
    ctx = min(ctx, cfg.max_position_embeddings)
    ids = tok.encode(text)[:tokens]
    n = len(ids) // ctx
    if n == 0:
        raise ConfigError(f"--calib: {text_path} has {len(ids)} tokens, fewer than one window of --calib-ctx {ctx}")
    return torch.tensor(ids[: n * ctx]).view(n, ctx)


def _collector(xs: list[torch.Tensor], ids: list[torch.Tensor], scales: list[torch.Tensor]
               ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], None]:
    def probe(x: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor | None) -> None:
        xs.append(x.cpu())
        ids.append(experts.cpu())
        if weights is not None:
            scales.append(weights.float().cpu())
    return probe


@torch.inference_mode()
def routed_inputs(model_dir: Path, windows: torch.Tensor, layers: list[int], on_layer: OnLayer,
                  start: tuple[int, torch.Tensor] | None = None, dtype: str = "auto") -> None:
    """Run `windows` through decoder layers 0..max(layers) of the original model at `model_dir`.

    After each layer, on_layer gets its output hidden states and, for the layers asked for, the
    MoE inputs (after the post-attention norm) of every token and the experts each was routed to.
    `start` = (next layer, hidden states after the layer before it) resumes a forward a checkpoint
    saved. Computes on the first GPU when there is one (the WeightStore's rule), else on the CPU."""
    reader = CheckpointReader(model_dir)
    cfg = parse_config(reader.config, reader.config_path)
    compute = resolve_dtype(dtype, reader.config, reader.config_path)
    plan: dict[str, Device] = {u: "disk" for u in unit_names(cfg)}
    store = WeightStore(reader, cfg, compute, plan, prefetch=True)
    model = MoEModel(reader, store, cfg, compute)
    try:
        nw, ctx = windows.shape
        per_batch = max(1, WINDOW_TOKENS // ctx)
        if start is None:
            first, emb = 0, store.get("embed")["weight"]
            hidden = torch.cat([F.embedding(windows[b:b + per_batch].to(emb.device), emb).cpu()
                                for b in range(0, nw, per_batch)])
            del emb
        else:
            first, hidden = start
        dev = store.device_of("layers.0")
        cos, sin = model.rope.cos_sin(torch.arange(ctx, device=dev), compute)
        mask = causal_mask(ctx, ctx, dev, cfg.sliding_window)
        wanted = set(layers)
        for i in range(first, max(layers) + 1):
            w = store.get(f"layers.{i}")
            xs: list[torch.Tensor] = []
            ids: list[torch.Tensor] = []
            scales: list[torch.Tensor] = []
            model.moe_probe = _collector(xs, ids, scales) if i in wanted else None
            for b in range(0, nw, per_batch):
                hidden[b:b + per_batch] = model._layer(i, w, hidden[b:b + per_batch].to(dev), cos, sin, mask,
                                                       None).cpu()
            del w
            model.moe_probe = None
            on_layer(i, hidden, torch.cat(xs) if xs else None, torch.cat(ids) if ids else None,
                     torch.cat(scales) if scales else None)
    finally:
        model.close()


RUNTIME = CalibRuntime(calibration_windows, routed_inputs)  # what compress() takes as calib_runtime
