"""Calibrated compression (`--calib`): the input statistics unit and the metrics the fits read.

One journaled unit, `calib`, runs before every fit: calibration text through the original model
(runtime/calibrate.py, handed in by the caller because the runtime sits on a floor above this
one), and for each compressed layer every routed expert's input metric (factorize/metric.py) in
`.mobe-state/calib/layer-N.state.zst`. Checkpointed per layer: the metrics of the layers done and
the hidden states after the last one (`hidden.state.zst`), so a killed calibration resumes at the
next layer, not at the embedding. Fits of a layer then weigh their error by its metric; gate_proj
and up_proj read the same input, so one metric serves both.

Cost at Kimi-K2 scale (k = 128, 131,072 tokens; `inspect --estimate --calib-tokens N` prints it):
metrics 384 x 7168 x 129 x 4 B = 1.42 GB per layer (85 GB for 60 layers, on the output's disk until
the run completes); hidden states 131k x 7168 in bf16 = 1.9 GB of RAM (plus the captured inputs of
the layer being measured, as much again); the forward reads every layer once (the whole
checkpoint, ~1 TB, at disk speed) and computes 2 x 32 G active parameters x 131k tokens = 8.4
PFLOP; each expert's eigen-solve is over its ~2.7k routed tokens (min(n, d)² max(n, d)).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..factorize import InputMetric, expert_metrics
from .events import Reporter
from .journal import STATE_DIR, Journal
from .options import CalibSettings
from .signals import Interrupted
from .state_io import load_state, save_state

UNIT = "calib"


@dataclass(frozen=True)
class CalibRuntime:
    """The runtime's two calibration functions (runtime/calibrate.py), passed down by the CLI."""

    windows: Callable[[Path, Path, int, int], torch.Tensor]
    routed_inputs: Callable[..., None]


def state_dir(out: Path) -> Path:
    return out / STATE_DIR / "calib"


def metric_path(out: Path, layer: int) -> Path:
    return state_dir(out) / f"layer-{layer}.state.zst"


def _hidden_path(out: Path) -> Path:
    return state_dir(out) / "hidden.state.zst"


def _valid(path: Path, settings: dict, **keys) -> tuple[dict[str, torch.Tensor], dict] | None:
    """A checkpoint written under these settings (and keys), else None (missing, other run, unreadable)."""
    if not path.exists():
        return None
    try:
        tensors, meta = load_state(path)
    except Exception:  # a torn or foreign file is redone, never trusted
        return None
    if meta.get("settings") != settings or any(meta.get(k) != v for k, v in keys.items()):
        return None
    return tensors, meta


def load_metric(out: Path, layer: int, settings: dict) -> InputMetric:
    """The input metric of `layer`'s experts, as the calib unit stored it."""
    found = _valid(metric_path(out, layer), settings, layer=layer)
    if found is None:
        raise ConfigError(f"{metric_path(out, layer)}: calibration statistics of layer {layer} are missing or from "
                          f"another run; rerun with --resume to measure them again")
    tensors, _ = found
    return InputMetric(tensors["diag"], tensors["V"])


def run(out: Path, src: Path, journal: Journal, layers: list[int], num_experts: int, calib: CalibSettings,
        settings: dict, runtime: CalibRuntime, device: str, stop, reporter: Reporter) -> None:
    """Measure the metrics of `layers` (those not already stored) and journal the unit.

    `settings` are the run's journaled settings (a checkpoint from other settings is not reused);
    `stop` the run's StopFlag: a Ctrl-C finishes the current layer, saves, and raises Interrupted."""
    t0 = time.monotonic()
    todo = [i for i in layers if _valid(metric_path(out, i), settings, layer=i) is None]
    info: dict = {"kind": UNIT, "layers": layers}
    if todo:
        windows = runtime.windows(src, calib.text, calib.tokens, calib.ctx)
        resumed = _valid(_hidden_path(out), settings)
        start = None
        if resumed is not None and int(resumed[1]["next_layer"]) <= todo[0]:
            start = (int(resumed[1]["next_layer"]), resumed[0]["hidden"])
            reporter.event("resume", unit=UNIT, text=f"{UNIT}: resuming the calibration forward at layer {start[0]}")
        reporter.event("unit_start", unit=UNIT, kind=UNIT, steps=0, start_step=0)
        reporter.event("message", text=f"calibration: {windows.numel()} tokens ({windows.shape[0]} windows of "
                                        f"{windows.shape[1]}) through layers 0..{todo[-1]}")

        def on_layer(i: int, hidden: torch.Tensor, X: torch.Tensor | None, experts: torch.Tensor | None,
                     scales: torch.Tensor | None = None) -> None:
            if i in todo and X is not None and experts is not None:
                dev = torch.device(device)
                metric, counts = expert_metrics(X.to(dev), experts.to(dev), num_experts, calib.rank, calib.damp,
                                                scales=None if scales is None else scales.to(dev))
                save_state(metric_path(out, i), {"diag": metric.diag, "V": metric.V, "tokens": counts.cpu()},
                           {"settings": settings, "layer": i})
                c = counts.float()
                reporter.event("message", text=f"calibration: layer {i}: tokens per expert min {int(c.min())}, "
                                                f"median {int(c.median())}, max {int(c.max())}")
            if i < todo[-1]:
                save_state(_hidden_path(out), {"hidden": hidden}, {"settings": settings, "next_layer": i + 1}, level=1)
            if stop.requested and i < todo[-1]:
                raise Interrupted(f"interrupted in {UNIT} after layer {i}; progress saved, rerun with --resume")

        runtime.routed_inputs(src, windows, todo, on_layer, start)
        info.update(tokens=int(windows.numel()), windows=int(windows.shape[0]))
    _hidden_path(out).unlink(missing_ok=True)
    info["seconds"] = time.monotonic() - t0
    journal.commit(UNIT, [], info, int(journal.data["next_shard_index"]))
    reporter.event("unit_done", unit=UNIT, kind=UNIT, seconds=info["seconds"], text=f"{UNIT} done")
