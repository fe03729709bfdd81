"""Fitting one projection of one layer: checkpointing, resume, Ctrl-C, and recovery.

Recovery rules: a non-finite loss rolls back to the last checkpoint (or the start), halves the
learning rate, logs it and continues; a device out-of-memory error rebuilds the solver with half
the expert batch and continues from the last checkpoint. Both are deterministic given the events.

A fit shared by several ranks (`shard`, --expert-parallel) decides together: every stop, checkpoint
and rollback decision is agreed over the ranks (one small all-reduce), so no rank is left waiting
in a collective the others never enter. Rank 0 writes the checkpoint, gathered to the
single-process layout, so any number of ranks (or one process) resumes it. An out-of-memory error
on one rank cannot be retried that way (the others are mid-step) and stops the run instead.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from .. import faults
from ..errors import ResourceError
from ..factorize import ExpertShard, InputMetric, MoBESpec, Targets
from .events import Reporter
from .job import FitSettings, StopFlag
from .journal import upgrade_settings
from .solvers import make_solver
from .state_io import load_state, save_state

MIN_LR = 1e-6
MAX_ROLLBACKS = 40  # halvings from any sane lr reach MIN_LR well before this; a bound, never a hang


class StopRequested(Exception):
    pass


class ProjectionFit:
    """One projection (`key`, e.g. layer.3.gate_proj) of z-scored targets W, fitted per `fit`.

    `run_settings` identify the run: a checkpoint written under other settings is not resumed.
    """

    def __init__(self, W_scaled: torch.Tensor | Targets, key: str, spec: MoBESpec, fit: FitSettings, run_settings: dict,
                 state_path: Path, stop: StopFlag, reporter: Reporter, metric: InputMetric | None = None,
                 shard: ExpertShard | None = None):
        self.W, self.key, self.spec, self.fit, self.run_settings = W_scaled, key, spec, fit, run_settings
        self.metric, self.shard = metric, shard
        self.state_path, self.stop, self.reporter = state_path, stop, reporter
        self.batch: int | None = None
        self.rollbacks = 0
        self.elapsed_before = 0.0
        self.t0 = time.monotonic()
        T = Targets.of(W_scaled)  # the loss of a zero fit, in the objective's own weighting
        self.mean_square = max(T.mean_square() if metric is None else T.weighted_mean_square(metric), 1e-30)
        self.solver = self._new_solver()
        self._restore(announce=True)

    def _new_solver(self):
        f = self.fit
        return make_solver(f.solver, self.W, self.spec, lr=f.lr, device=f.device, max_device_bytes=f.max_device_bytes,
                           seed=f.seed, tol=f.tol, expert_batch=self.batch, init=f.init, precision=f.precision,
                           schedule=f.schedule, total_steps=f.steps,
                           metric=self.metric, shard=self.shard)

    def _event(self, kind: str, /, **fields) -> None:
        self.reporter.event(kind, unit=self.key, **fields)

    def _restore(self, announce: bool = False) -> bool:
        """Load the unit's checkpoint into the solver, if there is a usable one."""
        if not self.state_path.exists():
            return False
        tensors, meta = load_state(self.state_path)
        if upgrade_settings(meta.get("settings") or {}) != self.run_settings or meta.get("unit") != self.key:
            self._event("warning", text=f"{self.state_path}: checkpoint is from other settings; restarting {self.key}")
            return False
        self.solver.load_state_dict(tensors, meta["solver"])
        self.elapsed_before = float(meta.get("seconds", 0.0))
        if announce:
            self._event("resume", text=f"{self.key}: resuming at step {self.solver.step_count} from {self.state_path.name}")
        return True

    def save(self) -> None:
        tensors, meta = self.solver.state_dict()  # sharded: every rank gathers, rank 0 writes
        if self.shard is not None and not self.shard.main:
            return
        size = save_state(self.state_path, tensors, {"settings": self.run_settings, "unit": self.key, "solver": meta,
                                                     "seconds": self.seconds()})
        self._event("checkpoint", step=self.solver.step_count, bytes=size,
                    text=f"{self.key}: checkpoint at step {self.solver.step_count} ({size / 2**20:.1f} MiB)")

    def release(self) -> None:
        """Drop the solver (its device memory) once its factors have been taken."""
        del self.solver
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def weighted_rel_error(self) -> float:
        """Relative error of the best iterate in the fit's own objective (weighted when calibrated)."""
        return math.sqrt(self.solver.best_loss / self.mean_square)

    def seconds(self) -> float:
        return self.elapsed_before + time.monotonic() - self.t0

    def _agreed(self, *flags: bool) -> tuple[bool, ...]:
        """The flags, or in a sharded fit: each OR-ed over the ranks in one all-reduce (the same
        answer on every rank). The first is the stop request: a stop asked for on any rank becomes
        this rank's too, so every rank stops at the same step."""
        agreed = flags if self.shard is None else self.shard.agree(*flags)
        self.stop.requested |= agreed[0]
        return agreed

    def _stopping(self) -> bool:
        return self._agreed(self.stop.requested)[0]

    def done(self) -> bool:
        return self.solver.step_count >= self.fit.steps or self.solver.converged

    def run(self) -> None:
        """Fit to the step budget (or convergence). Raises StopRequested after checkpointing on Ctrl-C."""
        f = self.fit
        self._event("unit_start", kind="factorize", steps=f.steps, start_step=self.solver.step_count)
        last_ckpt = time.monotonic()

        def should_stop() -> bool:
            s = self.solver
            if faults.nan_at_step(s.step_count) or faults.nan_from_step(s.step_count):
                s.params["B"].view(-1)[0] = float("nan")
            faults.signal_at_step(s.step_count)
            if faults.oom_at_step(s.step_count):
                raise torch.OutOfMemoryError("CUDA out of memory (injected)")
            # one agreement per step: stop requested, checkpoint due
            return any(self._agreed(self.stop.requested, time.monotonic() - last_ckpt >= f.checkpoint_every))

        def on_progress(step: int, loss: float, best: float) -> None:
            # loss: mean squared residual of the z-scored targets; rel_error: the one metric shown
            self._event("solver", step=step, loss=loss, best_loss=best,
                        rel_error=math.sqrt(best / self.mean_square) if math.isfinite(best) else None)

        while not self.done():
            if self._stopping():  # also between NaN rollbacks and OOM retries, not only after good steps
                self.save()
                raise StopRequested
            try:
                self.solver.run(f.steps - self.solver.step_count, callback=on_progress, should_stop=should_stop)
            except torch.OutOfMemoryError:
                self._shrink_batch()
                continue
            # the loss is the same on every rank; the parameters are each rank's own
            if not math.isfinite(self.solver.last_loss) or self._agreed(self.stop.requested, not self._params_finite())[1]:
                self._roll_back()  # never checkpoint a poisoned state
                continue
            if self._stopping():
                self.save()
                raise StopRequested
            if not self.done():
                self.save()
                last_ckpt = time.monotonic()

    def _params_finite(self) -> bool:
        return all(bool(torch.isfinite(t).all()) for t in self.solver.params.values())

    def _roll_back(self) -> None:
        bad_step, lr = self.solver.step_count, self.solver.lr * 0.5
        self.rollbacks += 1
        if not math.isfinite(lr) or lr < MIN_LR or self.rollbacks > MAX_ROLLBACKS:
            raise ResourceError(f"{self.key}: loss stays non-finite even at lr {self.solver.lr:g}; "
                                f"check the source weights for NaN/Inf")
        self.solver = self._new_solver()
        self._restore()
        self.solver.lr = lr
        self._event("warning", text=f"{self.key}: non-finite loss at step {bad_step}; rolled back to step "
                                    f"{self.solver.step_count}, learning rate lowered to {lr:g}", kind="nan_rollback")

    def _shrink_batch(self) -> None:
        old = self.solver.batch
        if self.shard is not None:
            raise ResourceError(f"{self.key}: device out of memory on rank with experts {self.shard.lo}-"
                                f"{self.shard.hi - 1}; lower --max-gpu-memory and rerun with --resume")
        if old <= 1:
            raise ResourceError(f"{self.key}: device out of memory even with one expert per batch; "
                                f"lower --max-gpu-memory or use --device cpu")
        lr = self.solver.lr
        self.batch = max(1, old // 2)
        del self.solver
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        self.solver = self._new_solver()
        if not self._restore():
            self.solver.lr = lr
        self._event("warning", text=f"{self.key}: device out of memory with {old} experts per batch; "
                                    f"retrying with {self.batch} from step {self.solver.step_count}", kind="oom_retry")
