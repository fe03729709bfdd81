"""Streaming, resumable MoBE conversion: one unit (a layer's copied tensors or one factorized
projection) at a time, each written to its own shards and journaled before the next starts.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ..checkpoint.families import get_family
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import parse_size
from ..errors import ConfigError, MobeError
from ..memory import pin_mmap_threshold
from ..verify import check_source
from ..factorize import INITS, METHODS, MethodPlan, MoBESpec, choose_bases_rank, fit_baseline, plan_method, prepare_targets, relative_error
from . import outputs, preflight
from .events import Reporter
from .journal import Journal
from .lock import OutputLock
from .options import CompressOptions, settings_for_journal
from .plan import PROJECTIONS, Unit, parse_layers, plan_units
from .fit import ProjectionFit, StopRequested

STATE_DIR = ".mobe-state"


class Interrupted(MobeError):
    """Ctrl-C / SIGTERM: progress was checkpointed; the run can be resumed."""

    exit_code = 130


@dataclasses.dataclass
class Job:
    src: Path
    out: Path
    opts: CompressOptions
    reader: CheckpointReader
    family: object
    spec: MoBESpec
    plan: MethodPlan  # what is stored per projection (mobe, or a baseline at the same budget)
    layers: list[int]
    settings: dict
    reporter: Reporter
    out_dtype: torch.dtype
    max_shard_bytes: int
    stop_requested: bool = False


def compress(src: str | Path, out: str | Path, opts: CompressOptions, reporter: Reporter | None = None) -> dict:
    """Compress `src` into `out`. Returns the summary dict (also reported as a `summary` event)."""
    reporter = reporter or Reporter()
    src, out = Path(src).resolve(), Path(out).resolve()
    outputs.check_not_overlapping(src, out)
    pin_mmap_threshold()  # layer-sized buffers never fragment the heap: peak RSS stays flat with depth
    reader = CheckpointReader(src)
    try:
        job = _make_job(src, out, opts, reader, reporter)
        out.mkdir(parents=True, exist_ok=True)
        with OutputLock(out, warn=lambda t: reporter.event("warning", text=t)), _catch_signals(job):
            journal = _open_journal(job)
            units = _plan(job)
            todo = [u for u in units if not journal.done(u.key)]
            preflight.check(job, todo, force=opts.force, warn=lambda t: reporter.event("warning", text=t))
            reporter.event("plan", total_units=len(units), done_units=len(units) - len(todo), source=str(src),
                           num_bases=job.spec.num_bases, rank=job.spec.rank, layers=job.layers)
            for unit in todo:
                if job.stop_requested:
                    raise Interrupted(f"interrupted before {unit.key}; progress saved, rerun with --resume")
                if unit.kind == "copy":
                    _run_copy(job, journal, unit)
                else:
                    _run_factorize(job, journal, unit)
            summary = outputs.finalize(job, journal, units)
            outputs.self_check(out)
            journal.mark_complete()
        reporter.event("summary", **summary)
        return summary
    finally:
        reader.close()


def _make_job(src: Path, out: Path, opts: CompressOptions, reader: CheckpointReader, reporter: Reporter) -> Job:
    family = get_family(reader.config, reader)
    check_source(reader, family)
    try:
        layers = parse_layers(opts.layers, family.moe_layers())
        out_dtype = opts.output_dtype()
        E, p, d = family.num_experts, family.moe_intermediate_size, family.hidden_size
        if opts.num_bases and opts.rank:
            m, r = opts.num_bases, opts.rank
        else:
            m, r = choose_bases_rank(E, p, d, opts.reduction if opts.reduction is not None else 0.25,
                                     groups=opts.groups, rank=opts.rank, num_bases=opts.num_bases)
        if opts.activation not in ("silu", "tanh"):
            raise ValueError(f"unknown --activation {opts.activation!r}; use silu or tanh")
        if opts.groups < 1 or E % opts.groups or m % opts.groups:
            raise ValueError(f"--groups {opts.groups} must divide the number of experts ({E}) and of bases ({m})")
        device = opts.resolved_device()
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"--device {device}: no CUDA device is available (use --device cpu or auto)")
        if opts.steps < 0 or opts.lr <= 0:
            raise ValueError("--steps must be >= 0 and --lr > 0")
        spec = MoBESpec(num_bases=m, rank=r, activation=opts.activation, groups=opts.groups)
        if opts.init not in INITS:
            raise ValueError(f"unknown --init {opts.init!r}; choose one of: {', '.join(INITS)}")
        if opts.method not in METHODS:
            raise ValueError(f"unknown --method {opts.method!r}; choose one of: {', '.join(METHODS)}")
        plan = plan_method(opts.method, E, p, d, spec)
        max_shard = parse_size(opts.max_shard_size)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    settings = settings_for_journal(opts, m, r, layers)
    return Job(src, out, opts, reader, family, spec, plan, layers, settings, reporter, out_dtype, max_shard)


def _open_journal(job: Job) -> Journal:
    return outputs.open_journal(job.out, job.settings, job.reader.fingerprint(), resume=job.opts.resume,
                                overwrite=job.opts.overwrite, reporter=job.reporter)


def _plan(job: Job) -> list[Unit]:
    excluded: set[str] = set()
    for layer in job.layers:
        for proj in PROJECTIONS:
            excluded.update(job.family.expert_tensor_names(layer, proj))
    return plan_units(job.reader.names(), job.layers, excluded)


def _run_copy(job: Job, journal: Journal, unit: Unit) -> None:
    # raw reads: bit-exact, FP8 stays FP8 with its scale
    items = ((name, job.reader.get(name)) for name in unit.tensors)
    outputs.write_unit(job.out, journal, unit.key, items, job.max_shard_bytes, job.reporter,
                       info={"kind": "copy", "tensors": len(unit.tensors)})


def _state_path(job: Job, unit: Unit) -> Path:
    return job.out / STATE_DIR / f"{unit.key}.state.zst"


def _run_factorize(job: Job, journal: Journal, unit: Unit) -> None:
    W = job.family.expert_stack(job.reader, unit.layer, unit.proj, torch.float32)
    W_scaled, std = prepare_targets(W)  # in place: one copy of the layer's targets
    if job.plan.method != "mobe":
        _run_baseline(job, journal, unit, W_scaled, std)
        return
    state_path = _state_path(job, unit)
    fit = ProjectionFit(job, unit, W_scaled, state_path)
    try:
        fit.run()
    except StopRequested:
        raise Interrupted(f"interrupted at {unit.key} step {fit.solver.step_count}; progress saved, rerun with --resume") from None
    factors = fit.solver.best_factors()
    rel = relative_error(W_scaled, factors)
    tensors = outputs.factor_tensors(job, unit, factors, std)
    info = {"kind": "factorize", "rel_error": rel, "steps": fit.solver.step_count, "best_loss": float(fit.solver.best_loss),
            "lr_final": fit.solver.lr}
    outputs.write_unit(job.out, journal, unit.key, tensors.items(), job.max_shard_bytes, job.reporter, info,
                       seconds_before=fit.seconds(), announce=False)
    state_path.unlink(missing_ok=True)


def _run_baseline(job: Job, journal: Journal, unit: Unit, W_scaled: torch.Tensor, std: float) -> None:
    """Closed-form baselines (svd, delta, molae): no solver state; the unit is the resume granule."""
    t0 = time.monotonic()
    job.reporter.event("unit_start", unit=unit.key, kind="factorize", steps=0, start_step=0)
    factors = fit_baseline(W_scaled, job.plan, job.opts.resolved_device())
    rel = relative_error(W_scaled, factors)
    info = {"kind": "factorize", "method": job.plan.method, "rel_error": rel, "steps": 0}
    outputs.write_unit(job.out, journal, unit.key, outputs.factor_tensors(job, unit, factors, std).items(),
                       job.max_shard_bytes, job.reporter, info, seconds_before=time.monotonic() - t0, announce=False)


@contextmanager
def _catch_signals(job: Job):
    """First Ctrl-C/SIGTERM asks the solver to checkpoint and stop; a second one aborts at once."""

    def handler(signum, frame):
        if job.stop_requested:
            raise KeyboardInterrupt
        job.stop_requested = True
        job.reporter.event("warning", text="interrupt received: checkpointing, then stopping (again to abort)")

    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, handler)
    except ValueError:  # not the main thread
        old = {}
    try:
        yield
        if job.stop_requested:
            raise Interrupted("interrupted; progress saved, rerun with --resume")
    finally:
        for s, h in old.items():
            signal.signal(s, h)
