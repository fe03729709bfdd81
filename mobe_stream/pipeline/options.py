"""Compress options: every value checked once, before anything is read or written.

`CompressOptions.validate()` is the one place an option is judged; it needs no model, so a typo
fails in milliseconds with exit 2 and the option's name, never after hours of work or after a
journal has recorded the bad value. Checks that need the model (groups dividing the experts,
layers that exist) run in `pipeline.job.make_job`, still before the first byte is written.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from .. import defaults
from ..checkpoint.safetensors_io import ST_TO_TORCH
from ..dtypes import AUTO, COMPUTE, FP8, dtype_key, dtype_name, to_torch
from ..errors import ConfigError
from ..factorize import INITS, METHODS, PRECISIONS, SCHEDULES
from ..sizes import parse_size
from .solvers import SOLVERS

# --dtype: the spellings of dtypes.py, fp8 included (e4m3 with fp32 128x128 block scales,
# checkpoint/fp8.py); `auto` is the source experts' storage dtype (resolve_dtype).
PRECISION_CHOICES = (AUTO, *PRECISIONS)
# --precision auto: the fastest precision whose final error stays within 1% of fp32's, per device
# kind (measured with tools/bench_solver.py --solvers als:scaled:fp32,als:scaled:bf16,...; CHANGELOG)
AUTO_PRECISION = {"cuda": "bf16", "cpu": "fp32"}
# a calibrated fit (--calib) is fp32 on every device: under bf16 (A in two parts) its weighted error
# is +1.0% over fp32's on average on the trained tiny model (+6% on layer 0), tf32 worse (CHANGELOG)
AUTO_PRECISION_CALIBRATED = "fp32"
ACTIVATIONS = ("silu", "tanh")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")
_LAYERS = re.compile(r"^\s*(all|\d+(\s*-\s*\d+)?(\s*,\s*\d+(\s*-\s*\d+)?)*)\s*$")


def _choice(option: str, value: str, allowed) -> None:
    if value not in allowed:
        raise ConfigError(f"unknown {option} {value!r}; choose one of: {', '.join(allowed)}")


def _number(option: str, value: float | None, *, low: float, strict: bool = False) -> None:
    """A finite number >= low (> low when strict); None passes (the option was not given)."""
    if value is None:
        return
    if not math.isfinite(value) or value < low or (strict and value == low):
        raise ConfigError(f"{option}: must be a finite number {'>' if strict else '>='} {low:g}, got {value!r}")


def check_layers_syntax(spec: str | None) -> None:
    """`1-3,7` or `all`: ranges ascending, at least one layer; which layers exist is the model's business."""
    if spec is None:
        return
    if not _LAYERS.match(spec):
        raise ConfigError(f"--layers: cannot parse {spec!r} (use e.g. 1-3,7 or all)")
    for part in spec.split(","):
        if "-" in part:
            a, b = (int(x) for x in part.split("-"))
            if a > b:
                raise ConfigError(f"--layers: range {part.strip()!r} runs backwards (write {b}-{a})")


def resolve_device(device: str) -> str:
    """`auto` -> cuda when available, else cpu; a CUDA device that is not there is a one-line error."""
    if not _DEVICE.match(device):
        raise ConfigError(f"--device: unknown device {device!r}; use auto, cpu, cuda or cuda:N")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return device


@dataclass(frozen=True)
class CalibSettings:
    text: Path
    tokens: int = defaults.CALIB_TOKENS
    ctx: int = defaults.CALIB_CTX
    rank: int = defaults.CALIB_RANK
    damp: float = defaults.CALIB_DAMP

    def validate(self) -> None:
        if not self.text.is_file():
            raise ConfigError(f"--calib: {self.text} is not a file")
        for option, value, low in (("--calib-tokens", self.tokens, 2), ("--calib-ctx", self.ctx, 2),
                                   ("--calib-rank", self.rank, 0)):
            if value < low:
                raise ConfigError(f"{option}: must be at least {low}, got {value}")
        _number("--calib-damp", self.damp, low=0)

    def for_journal(self) -> dict:
        """What decides the metrics: the text's content, token budget, window, rank, damping."""
        digest = hashlib.sha256(self.text.read_bytes()).hexdigest()
        return {"sha256": digest, "tokens": self.tokens, "ctx": self.ctx, "rank": self.rank, "damp": self.damp}


@dataclass
class CompressOptions:
    method: str = "mobe"
    num_bases: int | None = None
    rank: int | None = None
    reduction: float | None = None
    activation: str = "silu"
    groups: int = 1
    solver: str = defaults.SOLVER
    init: str = defaults.INIT
    steps: int = defaults.STEPS
    precision: str = defaults.PRECISION
    schedule: str = defaults.SCHEDULE
    lr: float = defaults.LR
    tol: float | None = None
    layers: str | None = None
    device: str = "auto"
    seed: int = 0
    dtype: str = AUTO
    max_shard_size: str = "5GB"
    max_gpu_memory: str | None = None
    checkpoint_every: float = 300.0
    # calibrated fit (pipeline/calib.py): text file, token budget, window, metric rank, damping
    calib: str | None = None
    calib_tokens: int = defaults.CALIB_TOKENS
    calib_ctx: int = defaults.CALIB_CTX
    calib_rank: int = defaults.CALIB_RANK
    calib_damp: float = defaults.CALIB_DAMP
    # under torchrun: fit each projection with all ranks, experts split over them (not journaled:
    # the output differs from a unit-parallel run only by float rounding, like another batch size)
    expert_parallel: bool = False
    resume: bool = False
    overwrite: bool = False
    force: bool = False
    # the options the user typed (the CLI fills it); None: all of them (API callers). On --resume the
    # others are taken from the journal, so a resume needs no retyping.
    explicit: frozenset[str] | None = None

    def validate(self) -> None:
        """Raise ConfigError (exit 2) naming the first bad option; touches no file."""
        _choice("--method", self.method, METHODS)
        _choice("--solver", self.solver, SOLVERS)
        _choice("--init", self.init, INITS)
        _choice("--precision", self.precision, PRECISION_CHOICES)
        _choice("--schedule", self.schedule, SCHEDULES)
        _choice("--activation", self.activation, ACTIVATIONS)
        dtype_name(self.dtype, "--dtype", fp8=True)
        for option, value in (("--num-bases", self.num_bases), ("--rank", self.rank)):
            if value is not None and value < 1:
                raise ConfigError(f"{option}: must be at least 1, got {value}")
        if self.groups < 1:
            raise ConfigError(f"--groups: must be at least 1, got {self.groups}")
        if self.reduction is not None and not (math.isfinite(self.reduction) and 0 < self.reduction < 1):
            raise ConfigError(f"--reduction: must lie strictly between 0 and 1 (e.g. 0.25), got {self.reduction!r}")
        if self.steps < 0:
            raise ConfigError(f"--steps: must be >= 0, got {self.steps}")
        _number("--lr", self.lr, low=0, strict=True)
        _number("--tol", self.tol, low=0)
        _number("--checkpoint-every", self.checkpoint_every, low=0)  # 0: after every step
        if self.seed < 0:
            raise ConfigError(f"--seed: must be >= 0, got {self.seed}")
        check_layers_syntax(self.layers)
        parse_size(self.max_shard_size, "--max-shard-size")
        if self.max_gpu_memory is not None:
            parse_size(self.max_gpu_memory, "--max-gpu-memory")
        resolve_device(self.device)
        calib = self.calib_settings()
        if calib is not None:
            if self.method != "mobe":
                raise ConfigError(f"--calib: calibrated fits are for --method mobe, not {self.method}")
            calib.validate()

    def calib_settings(self) -> CalibSettings | None:
        if self.calib is None:
            return None
        return CalibSettings(Path(self.calib).expanduser().resolve(), self.calib_tokens, self.calib_ctx,
                             self.calib_rank, self.calib_damp)

    def resolved_device(self) -> str:
        return resolve_device(self.device)

    def with_journal_settings(self, settings: dict) -> tuple[CompressOptions, list[str]]:
        """These options with every one the user did not type taken from a journal's settings, and
        the names taken. A typed option that differs is left alone (the journal check refuses it)."""
        if self.explicit is None:
            return self, []
        known = {f.name for f in fields(self)}
        taken = {k: v for k, v in _options_from_settings(settings).items()
                 if k in known and k not in self.explicit and getattr(self, k) != v}
        if self.explicit & {"num_bases", "rank", "reduction"}:  # a typed setting decides m and r itself
            taken.pop("num_bases", None)
            taken.pop("rank", None)
        return replace(self, **taken), sorted(taken)

    def resolved_precision(self) -> str:
        return resolve_precision(self.precision, self.resolved_device(), calibrated=self.calib is not None)


def _options_from_settings(settings: dict) -> dict:
    """Journal settings (settings_for_journal) back as option values."""
    out = {k: settings[k] for k in ("method", "solver", "init", "precision", "schedule", "num_bases", "rank", "activation",
                                    "groups", "steps", "lr", "tol", "seed") if k in settings}
    calib = settings.get("calib")
    if isinstance(calib, dict):
        out.update(calib=calib.get("path"), calib_tokens=calib.get("tokens"), calib_ctx=calib.get("ctx"),
                   calib_rank=calib.get("rank"), calib_damp=calib.get("damp"))
    if "dtype" in settings and settings["dtype"] in {**COMPUTE, **FP8}:  # recorded resolved: "bfloat16", "float8_e4m3fn"
        out["dtype"] = settings["dtype"]
    if isinstance(settings.get("layers"), list):
        out["layers"] = ",".join(str(x) for x in settings["layers"])
    if isinstance(settings.get("max_shard_size"), int):
        out["max_shard_size"] = str(settings["max_shard_size"])
    return out


def resolve_precision(precision: str, device: str, calibrated: bool = False) -> str:
    """`--precision` for a resolved device (`auto`: by device kind, AUTO_PRECISION; for a calibrated
    fit AUTO_PRECISION_CALIBRATED)."""
    _choice("--precision", precision, PRECISION_CHOICES)
    if precision != AUTO:
        return precision
    return AUTO_PRECISION_CALIBRATED if calibrated else AUTO_PRECISION[device.partition(":")[0]]


def resolve_dtype(dtype: str, source_dtypes: set[str]) -> torch.dtype:
    """`--dtype` as a torch dtype; `auto` is the storage dtype (safetensors names, e.g. F8_E4M3 -> fp8)
    of the source experts' gate/up weights, which must be one output dtype."""
    if dtype_name(dtype, "--dtype", fp8=True) != AUTO:
        return to_torch(dtype)
    found = {ST_TO_TORCH.get(s) for s in source_dtypes}
    if len(found) != 1 or next(iter(found)) not in {to_torch(n) for n in (*COMPUTE.values(), *FP8.values())}:
        raise ConfigError(f"--dtype auto: the source experts are stored as {', '.join(sorted(source_dtypes)) or 'nothing'}; "
                          f"choose --dtype bf16, fp16, fp32 or fp8")
    return found.pop()  # type: ignore[return-value]


def settings_for_journal(opts: CompressOptions, num_bases: int, rank: int, layers: list[int],
                         out_dtype: torch.dtype) -> dict:
    """What determines the output tensors. Device, checkpoint cadence and memory caps do not.

    Sizes are stored parsed (bytes), so `5000MB` and `5GB` are the same setting on resume. A
    calibrated run adds `calib` (the text's path and digest, tokens, ctx, rank, damp); a data-free
    run has no such key, as before calibration existed.
    """
    calib = opts.calib_settings()
    extra = {} if calib is None else {"calib": {"path": str(calib.text), **calib.for_journal()}}
    return {
        "method": opts.method,
        "solver": opts.solver,
        "init": opts.init,
        "precision": opts.precision,  # as asked: `auto` on a resume elsewhere is the same run
        "schedule": opts.schedule,
        "num_bases": num_bases,
        "rank": rank,
        "activation": opts.activation,
        "groups": opts.groups,
        "steps": opts.steps,
        "lr": opts.lr,
        "tol": opts.tol,
        "seed": opts.seed,
        "dtype": dtype_key(out_dtype),  # resolved: `auto` and `fp8` on an FP8 source are one run
        "layers": layers,
        "max_shard_size": parse_size(opts.max_shard_size, "--max-shard-size"),
        **extra,
    }
