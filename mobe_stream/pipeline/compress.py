"""Streaming, resumable MoBE conversion: one unit (a layer's copied tensors or one factorized
projection) at a time, each written to its own shards and journaled before the next starts.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint import fp8
from ..checkpoint.reader import CheckpointReader
from ..errors import CheckpointError, ConfigError
from ..factorize import ExpertShard, Targets, fit_baseline, refit_for_storage, relative_error, zscored
from ..memory import pin_mmap_threshold
from ..verify import verify
from . import calib, dist, mobe_output, outdir, preflight
from .events import Reporter
from .fit import ProjectionFit, StopRequested
from .job import CompressJob, make_job
from .journal import STATE_DIR, Journal, upgrade_settings
from .lock import OutputLock
from .options import CompressOptions
from .plan import PROJECTIONS, Unit, plan_units
from .signals import Interrupted, catch_signals

__all__ = ["Interrupted", "compress"]  # Interrupted is imported from here by demo.py and older callers


def compress(src: str | Path, out: str | Path, opts: CompressOptions, reporter: Reporter | None = None,
             calib_runtime: calib.CalibRuntime | None = None) -> dict:
    """Compress `src` into `out`. Returns the summary dict (also reported as a `summary` event).

    Order matters: options, source and output are all judged before the output directory is
    created, so a typo or a bad source leaves nothing behind. A calibrated run (`opts.calib`) needs
    the runtime's calibration forward (runtime/calibrate.py; the CLI passes it: the runtime sits on
    a floor above this one).
    """
    reporter = reporter or Reporter()
    opts.validate()
    if opts.calib is not None and calib_runtime is None:
        raise ConfigError("--calib: this caller did not provide the calibration forward "
                          "(pass calib_runtime=mobe_stream.runtime.calibrate.RUNTIME)")
    src, out = Path(src).resolve(), Path(out).resolve()
    if opts.resume:
        opts = _reuse_journal_settings(opts, out, reporter)
    outdir.check_not_overlapping(src, out)
    pin_mmap_threshold()  # layer-sized buffers never fragment the heap: peak RSS stays flat with depth
    reader = CheckpointReader(src)
    world = dist.world_from_env()
    try:
        job = make_job(src, out, opts, reader)
        dist.init(world, cuda=torch.cuda.is_available())
        if world.main:
            outdir.prepare(out)
        warn = lambda t: reporter.event("warning", text=t)  # noqa: E731
        lock = OutputLock(out, warn=warn) if world.main else contextlib.nullcontext()
        with lock, catch_signals(job.stop, reporter):
            units = _plan(job)
            journal = _open(job, units, opts, reporter, warn) if world.main else None
            if world.main and world.size > 1:
                dist.reset_progress(out / STATE_DIR)
            dist.barrier(world)  # rank 0 has created or resumed the journal
            if journal is None:
                journal = Journal.load(out)
                assert journal is not None
                journal.shard_stride = SHARD_STRIDE
            elif world.size > 1:
                journal.shard_stride = SHARD_STRIDE
            expert_parallel = opts.expert_parallel and world.size > 1
            # rank 0 shows every rank's units; expert-parallel ranks all work on rank 0's units
            with contextlib.nullcontext() if expert_parallel else dist.shared_progress(out / STATE_DIR, world, reporter):
                if expert_parallel:
                    _run_expert_parallel(job, journal, units, world, reporter, calib_runtime)
                else:
                    _run_claimed(job, journal, units, world, reporter, calib_runtime)
                dist.barrier(world)  # every unit journaled by some rank
            if not world.main:
                return {}
            journal.reload()
            missing = [u.key for u in units if not journal.done(u.key)]
            if missing:
                raise Interrupted(f"{len(missing)} unit(s) not finished ({missing[0]} ...); rerun with --resume")
            outdir.renumber_shards(out, journal, [u.key for u in units])
            summary = mobe_output.finalize(job, journal, units)
            outdir.self_check(out, lambda d: verify(d, full=False, own_run=True))
            journal.mark_complete()
            shutil.rmtree(calib.state_dir(out), ignore_errors=True)  # the metrics served their fits
            shutil.rmtree(out / STATE_DIR / dist.PROGRESS_DIR, ignore_errors=True)
        reporter.event("summary", **summary)
        return summary
    finally:
        reader.close()
        dist.shutdown(world)


def _run_unit(job: CompressJob, journal: Journal, unit: Unit, reporter: Reporter,
              calib_runtime: calib.CalibRuntime | None) -> None:
    if unit.kind == "copy":
        _run_copy(job, journal, unit, reporter)
    elif unit.kind == calib.UNIT:
        assert job.calib is not None and calib_runtime is not None
        calib.run(job.out, job.src, journal, job.layers, job.family.num_experts, job.calib, job.settings,
                  calib_runtime, job.fit.device, job.stop, reporter)
    else:
        _run_factorize(job, journal, unit, reporter)


def _run_claimed(job: CompressJob, journal: Journal, units: list[Unit], world: dist.World, reporter: Reporter,
                 calib_runtime: calib.CalibRuntime | None) -> None:
    """One process does every unit; several (torchrun) each take the next unit nobody holds."""
    claims = dist.Claims(job.out / STATE_DIR, world) if world.size > 1 else None
    try:
        for unit in [u for u in units if not journal.done(u.key)]:
            if job.stop.requested:
                raise Interrupted(f"interrupted before {unit.key}; progress saved, rerun with --resume")
            if claims is not None:
                journal.reload()
                if journal.done(unit.key) or not claims.try_claim(unit.key):
                    continue
                journal.reload()  # another rank may have finished it and let its claim go meanwhile
                if journal.done(unit.key):
                    claims.release(unit.key)
                    continue
            _run_unit(job, journal, unit, reporter, calib_runtime)
            if claims is not None:
                claims.release(unit.key)
    finally:
        if claims is not None:
            claims.close()


def _run_expert_parallel(job: CompressJob, journal: Journal, units: list[Unit], world: dist.World,
                         reporter: Reporter, calib_runtime: calib.CalibRuntime | None) -> None:
    """--expert-parallel: every rank fits each projection together with the others, each owning a
    run of its experts. Rank 0 alone does the other units (copies, calibration, closed-form
    baselines) and writes every output. Before a fit the other ranks wait for rank 0 to journal
    every earlier unit by polling the journal, not in a collective: a calibration forward can take
    longer than a process group's timeout. The stop decision is agreed at each fit's start (and
    inside it), so all ranks leave at the same point."""
    fits = job.plan.method == "mobe"
    shard = dist.expert_shard(world, job.family.num_experts)  # every fit splits the experts alike
    todo = [u for u in units if not journal.done(u.key)]
    for i, unit in enumerate(todo):
        if not (unit.kind == "factorize" and fits):
            if world.main:
                if job.stop.requested:
                    raise Interrupted(f"interrupted before {unit.key}; progress saved, rerun with --resume")
                _run_unit(job, journal, unit, reporter, calib_runtime)
            continue
        if not world.main:
            _await_journaled(job, journal, [u.key for u in todo[:i]])
        if shard.agree(job.stop.requested)[0]:
            job.stop.requested = True
            raise Interrupted(f"interrupted before {unit.key}; progress saved, rerun with --resume")
        _run_factorize(job, journal, unit, reporter, shard)


JOURNAL_POLL_SECONDS = 0.2


def _await_journaled(job: CompressJob, journal: Journal, keys: list[str]) -> None:
    while True:
        journal.reload()
        if all(journal.done(k) for k in keys):
            return
        if job.stop.requested:
            raise Interrupted("interrupted while waiting for rank 0; rerun with --resume")
        time.sleep(JOURNAL_POLL_SECONDS)


COPY_BYTES_PER_S = 1e9  # copied units: read + write as stored, about disk speed
STEP_SECONDS_UNKNOWN = 0.05  # a factorize step where there is no estimate (a GPU not in the table)


def _unit_seconds(job: CompressJob, unit: Unit, est) -> float:
    """Expected seconds of a unit, so progress and ETA weigh the work still to do by its cost (a
    factorized projection is hours on Kimi-K2, a layer's copy seconds)."""
    if unit.kind == "copy":
        return sum(job.reader.info(n).nbytes for n in unit.tensors) / COPY_BYTES_PER_S
    if unit.kind == calib.UNIT:  # the calibration forward reads the checkpoint once
        return sum(job.reader.info(n).nbytes for n in job.reader.names()) / COPY_BYTES_PER_S
    if est is None:
        return job.fit.steps * STEP_SECONDS_UNKNOWN
    return job.fit.steps * est.step_seconds + est.init_seconds


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _reuse_journal_settings(opts: CompressOptions, out: Path, reporter: Reporter) -> CompressOptions:
    """On --resume, options not typed again come from the run's journal (and are checked again)."""
    journal = Journal.load(out) if out.is_dir() else None
    if journal is None:
        return opts
    opts, taken = opts.with_journal_settings(upgrade_settings(journal.data["settings"]))
    if taken:
        opts.validate()
        reporter.event("message", text=f"resuming with the journal's {', '.join('--' + t.replace('_', '-') for t in taken)}")
    return opts


def _open(job: CompressJob, units: list[Unit], opts: CompressOptions, reporter: Reporter, warn) -> Journal:
    """Rank 0 (or the only process): disk and RAM judged before the journal exists (a refused run
    leaves no state behind), then the journal created or resumed, the estimate and the plan told."""
    src, out, reader = job.src, job.out, job.reader
    earlier = Journal.load(out) if opts.resume else None
    todo = [u for u in units if earlier is None or not earlier.done(u.key)]
    need_disk = preflight.projected_output_bytes(reader, job.family, job.plan, todo, job.output.dtype, job.output.block,
                                                 outdir.side_files_bytes(src))
    need_ram = preflight.layer_ram_bytes(job) if any(u.kind == "factorize" for u in todo) else None
    preflight.check(out, need_disk, need_ram, force=opts.force, warn=warn)
    journal = outdir.open_journal(out, job.settings, reader.fingerprint(), resume=opts.resume,
                                  overwrite=opts.overwrite, reporter=reporter,
                                  side_files=[e.name for e in outdir.side_files(src)])
    todo = [u for u in units if not journal.done(u.key)]
    fits = sum(u.kind == "factorize" for u in todo)
    est = preflight.estimate_for(job, fits) if fits and job.plan.method == "mobe" else None
    if est is not None:
        reporter.event("estimate", text=f"estimate: {fits} projections x {est.steps} steps, "
                                        f"{est.step_seconds:.3g} s/step, about {_duration(est.hours * 3600)} "
                                        f"({est.basis})", **est.as_dict())
    reporter.event("plan", total_units=len(units), done_units=len(units) - len(todo), source=str(src),
                   num_bases=job.spec.num_bases, rank=job.spec.rank, layers=job.layers,
                   unit_seconds={u.key: _unit_seconds(job, u, est) for u in todo})
    return journal


SHARD_STRIDE = 1000  # shard indices a unit reserves in a distributed run (renumbered at the end)


def _plan(job: CompressJob) -> list[Unit]:
    excluded: set[str] = set()
    for layer in job.layers:
        for proj in PROJECTIONS:
            excluded.update(job.family.expert_tensor_names(layer, proj))
    units = plan_units(job.reader.names(), job.layers, excluded)
    return ([Unit(calib.UNIT, calib.UNIT)] if job.calib is not None else []) + units


def _run_copy(job: CompressJob, journal: Journal, unit: Unit, reporter: Reporter) -> None:
    # raw reads: bit-exact, FP8 stays FP8 with its scale
    items = ((name, job.reader.get(name)) for name in unit.tensors)
    outdir.write_unit(job.out, journal, unit.key, items, job.output.max_shard_bytes, reporter,
                      info={"kind": "copy", "tensors": len(unit.tensors)})


def _state_path(job: CompressJob, unit: Unit) -> Path:
    return job.out / STATE_DIR / f"{unit.key}.state.zst"


def _run_factorize(job: CompressJob, journal: Journal, unit: Unit, reporter: Reporter,
                   shard: ExpertShard | None = None) -> None:
    """Fit and write one projection. With `shard` this rank fits its experts with the others
    (--expert-parallel): all take the fit's factors, rank 0 alone measures and writes them."""
    assert unit.layer is not None and unit.proj is not None
    # the targets in the source's own precision (Kimi-K2: 5.6 GB of FP8 instead of 22.5 GB of fp32)
    data, scales = job.family.expert_stack_stored(job.reader, unit.layer, unit.proj)
    source = Targets(data, scales, job.reader.scale_block)
    _refuse_nonfinite(job, unit, source)
    W_scaled, std = zscored(source)  # reads back z-scored; no copy
    t0 = time.monotonic()
    metric = _metric(job, journal, unit.layer) if job.calib is not None else None
    if job.plan.method == "mobe":
        state_path = _state_path(job, unit)
        fit = ProjectionFit(W_scaled, unit.key, job.spec, job.fit, job.settings, state_path, job.stop, reporter,
                            metric, shard)
        try:
            fit.run()
        except StopRequested:
            raise Interrupted(f"interrupted at {unit.key} step {fit.solver.step_count}; progress saved, "
                              f"rerun with --resume") from None
        factors = fit.solver.best_factors()  # sharded: gathered on every rank
        if shard is not None and not shard.main:
            fit.release()
            return
        info = {"kind": "factorize", "steps": fit.solver.step_count, "best_loss": float(fit.solver.best_loss),
                "lr_final": fit.solver.lr}
        if metric is not None:  # the objective the fit minimised: error weighted by the routed inputs
            info["rel_error_calib"] = fit.weighted_rel_error()
        seconds = fit.seconds()
        fit.release()  # the solver's device state (Kimi-K2: ~40 GB) before the error passes below
    else:  # closed-form baselines (svd, delta, molae): no solver state; the unit is the resume granule
        reporter.event("unit_start", unit=unit.key, kind="factorize", steps=0, start_step=0)
        factors = fit_baseline(W_scaled.dense(), job.plan, job.fit.device)
        info = {"kind": "factorize", "method": job.plan.method, "steps": 0}
        seconds = time.monotonic() - t0
    dev = job.fit.device
    info["rel_error_fit"] = relative_error(W_scaled, factors, device=dev)
    if job.output.dtype != torch.float32:  # the shared part is stored first, A re-solved against it
        factors = refit_for_storage(W_scaled, factors, mobe_output.roundtrip_for(job.output), job.fit.device,
                                    metric=metric)
    prefix = job.family.experts_prefix(unit.layer)
    tensors = mobe_output.factor_tensors(prefix, unit.proj, factors, std, job.output)
    info["rel_error"] = relative_error(W_scaled, mobe_output.stored_factors(job.plan, prefix, unit.proj, tensors,
                                                                            job.output, std), device=dev)
    outdir.write_unit(job.out, journal, unit.key, tensors.items(), job.output.max_shard_bytes, reporter, info,
                      seconds_before=seconds, announce=False)
    if job.plan.method == "mobe":
        state_path.unlink(missing_ok=True)


CALIB_POLL_SECONDS = 2.0


def _metric(job: CompressJob, journal: Journal, layer: int):
    """The layer's input metric; in a distributed run another rank may still be measuring it."""
    while not journal.done(calib.UNIT):
        if job.stop.requested:
            raise Interrupted("interrupted while waiting for the calibration unit; rerun with --resume")
        time.sleep(CALIB_POLL_SECONDS)
        journal.reload()
    return calib.load_metric(job.out, layer, job.settings)


def _refuse_nonfinite(job: CompressJob, unit: Unit, W: Targets) -> None:
    """A NaN/Inf in the targets would be fitted into every basis of the layer: refuse, naming the
    stored tensor. One pass over W, an expert at a time (a whole-layer mask would be a quarter of
    W's size in RAM); cheap next to reading W."""
    e = W.first_nonfinite()
    if e is None:
        return
    assert unit.layer is not None and unit.proj is not None
    weights = [n for n in job.family.expert_tensor_names(unit.layer, unit.proj) if not n.endswith(fp8.SCALE_SUFFIX)]
    name = weights[e] if len(weights) == W.shape[0] else f"{weights[0]} (expert {e})"  # per-expert or fused
    info = job.reader.info(weights[min(e, len(weights) - 1)])
    raise CheckpointError(f"tensor {name} contains NaN or Inf ({unit.proj} of expert {e}); the source is corrupt, "
                          f"refusing to compress it", job.reader.model_dir / info.shard)
