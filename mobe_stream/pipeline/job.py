"""The compress job: options resolved against one source checkpoint, as typed values.

Lowest floor of `pipeline/`: the modules above take the narrow pieces they need (`FitSettings`,
`OutputSpec`, a `StopFlag`), not the whole job. `make_job` is where model-dependent checks run
(groups dividing the experts, layers that exist, a setting that actually removes parameters),
after `CompressOptions.validate()` and before any byte of output is written.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..checkpoint import fp8
from ..checkpoint.families import Family, get_family
from ..checkpoint.mobe_format import PROJECTIONS
from ..checkpoint.reader import CheckpointReader
from ..errors import ConfigError
from ..factorize import MethodPlan, MoBESpec, choose_bases_rank, plan_method
from ..sizes import parse_size
from ..verify import check_source
from .options import CalibSettings, CompressOptions, resolve_dtype, settings_for_journal
from .plan import parse_layers


@dataclass
class StopFlag:
    """Set by the signal handler (first Ctrl-C/SIGTERM); polled between solver steps and units."""

    requested: bool = False


@dataclass(frozen=True)
class FitSettings:
    """What one projection's fit needs to know (fit.py)."""

    solver: str
    init: str
    steps: int
    lr: float
    tol: float | None
    seed: int
    device: str
    max_device_bytes: int | None
    checkpoint_every: float
    precision: str = "fp32"  # resolved: fp32, tf32 or bf16
    schedule: str = "constant"  # the step-size policy (factorize/schedule.py)


@dataclass(frozen=True)
class OutputSpec:
    """How factor tensors are stored (mobe_output.py); `block` is the FP8 block when dtype is FP8."""

    dtype: torch.dtype
    max_shard_bytes: int
    block: tuple[int, int] = fp8.DEFAULT_BLOCK

    @property
    def is_fp8(self) -> bool:
        return self.dtype == fp8.FP8_DTYPE


@dataclass
class CompressJob:
    src: Path
    out: Path
    reader: CheckpointReader
    family: Family
    spec: MoBESpec
    plan: MethodPlan  # what is stored per projection (mobe, or a baseline at the same budget)
    layers: list[int]
    settings: dict  # what decides the output; journaled, compared on --resume
    fit: FitSettings
    output: OutputSpec
    opts: CompressOptions
    calib: CalibSettings | None = None  # a calibrated fit (pipeline/calib.py)
    stop: StopFlag = field(default_factory=StopFlag)


def make_job(src: Path, out: Path, opts: CompressOptions, reader: CheckpointReader) -> CompressJob:
    """Resolve `opts` against the source; every failure is a ConfigError naming the option."""
    opts.validate()
    family = get_family(reader.config, reader)
    check_source(reader, family)  # names a bad tensor and its shard before any dtype talk
    E, p, d = family.num_experts, family.moe_intermediate_size, family.hidden_size
    try:
        layers = parse_layers(opts.layers, family.moe_layers())
        if opts.groups > E or E % opts.groups:
            raise ValueError(f"--groups {opts.groups} must divide the number of experts per layer ({E})")
        m, r = choose_bases_rank(E, p, d, opts.reduction, groups=opts.groups, rank=opts.rank, num_bases=opts.num_bases)
        spec = MoBESpec(num_bases=m, rank=r, activation=opts.activation, groups=opts.groups)
        if spec.bases_per_group > E // opts.groups:
            raise ValueError(f"{spec.bases_per_group} bases per group need at least as many experts per group "
                             f"(have {E // opts.groups})")
        plan = plan_method(opts.method, E, p, d, spec)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    fit = FitSettings(solver=opts.solver, init=opts.init, steps=opts.steps, precision=opts.resolved_precision(),
                      schedule=opts.schedule,
                      lr=opts.lr, tol=opts.tol, seed=opts.seed,
                      device=opts.resolved_device(),
                      max_device_bytes=parse_size(opts.max_gpu_memory, "--max-gpu-memory") if opts.max_gpu_memory else None,
                      checkpoint_every=opts.checkpoint_every)
    out_dtype = resolve_dtype(opts.dtype, source_expert_dtypes(reader, family, layers))
    output = OutputSpec(out_dtype, parse_size(opts.max_shard_size, "--max-shard-size"),
                        reader.scale_block)
    return CompressJob(src, out, reader, family, spec, plan, layers,
                       settings_for_journal(opts, m, r, layers, out_dtype), fit, output, opts, opts.calib_settings())


def source_expert_dtypes(reader: CheckpointReader, family: Family, layers: list[int]) -> set[str]:
    """Safetensors dtypes of the compressed layers' gate/up expert weights ({"F8_E4M3"}, {"BF16"}, ...)."""
    return {reader.info(n).dtype for layer in layers for proj in PROJECTIONS
            for n in family.expert_tensor_names(layer, proj) if not n.endswith(fp8.SCALE_SUFFIX)}
