"""What every MoBE solver shares: expert batching through the device, Adam updates, best-iterate
tracking, convergence stopping and an exact, pickle-free state dict.

One step is one full pass over all experts. The targets stay in their storage precision (FP8 +
block scales, bf16 or fp32; targets.py) and each batch is dequantized and z-scored on the compute
device inside the step. Targets, per-expert parameters (A_e, α_e) and their Adam moments live on the
"home" device: the compute device when they fit beside the bases (cost.plan_memory decides), else
host memory, from where they travel with their batch; the shared bases B stay on the compute device
and their gradient accumulates over the pass (autograd accumulates into one leaf). Adam is
elementwise and per-expert parameters only get gradient from their own expert, so updating them
batch by batch equals the full-batch update; only B's gradient summation order
depends on the batch size (results then agree to float rounding).

Host syncs: when everything is resident on a CUDA device the best iterate is tracked on the device
(torch.where), so a step never waits for the GPU; the loss is read only when a callback is due or
`tol` is set. When experts stream through the device, targets and per-expert state are pinned on
the host, the next batch is copied on a side stream while the current one computes, and the step
ends with one sync (the host-side best iterate must know whether the loss improved).

A calibrated fit passes an input metric (metric.py): every squared error becomes tr(R H Rᵀ) and
the closed-form A its weighted argmin. The metric stays on the compute device (it is small next to
the bases) and is sliced per batch like the targets.

A solver may own only a run of the experts (`shard`, shard.py): its per-expert state then holds
those rows only, the loss and B's gradient are summed over the processes before B's update, and
state_dict / best_factors gather the full tensors (in expert order) so a checkpoint is the same
file whatever the number of processes. Expert ids passed to the hooks (`idx`) stay global (the
expert's group, the metric's rows); per-expert storage is indexed from `lo`.

`best_factors()` returns factors of the *scaled* targets with scale 1.0: the caller folds the
std from `zscored` in (see FORMAT.md: it goes into A).
"""

from __future__ import annotations

import math
import weakref

import torch

from .cost import MemoryPlan, device_budget, plan_memory
from .init import initial_factors
from .metric import InputMetric
from .model import MoBEFactors, MoBESpec
from .precision import Precision
from .schedule import BASIS_STEP_CAP, SCHEDULES, basis_step_scale, lr_factor
from .shard import ExpertShard
from .targets import Targets

BETAS = (0.9, 0.999)  # the paper's (and torch's) Adam; solvers may choose their own (Solver.betas)
EPS = 1e-8


def _grad(t: torch.Tensor) -> torch.Tensor:
    """t.grad after backward() (None there would mean t was not part of the loss: a bug)."""
    assert t.grad is not None, "tensor took no part in the loss"
    return t.grad


def _adam_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, t: int,
           scale: torch.Tensor | None = None, betas: tuple[float, float] = BETAS) -> None:
    """One Adam update of p in place (step t, bias-corrected); `scale` [n, 1, ..] multiplies the
    step of each of p's n leading slices (the relative basis steps of schedule.py).

    torch's fused kernel: it reads p, g, m, v once and writes p, m, v once (28 bytes an fp32
    element), where the same update as separate tensor ops makes ~22 passes (88 bytes): for the
    bases of a Kimi-K2 projection (1.9 G elements) 53 GB instead of 165 GB every step. A scaled
    update takes one launch per slice, each with its own lr as a device scalar (no host sync)."""
    b1, b2 = betas
    step = [torch.full((), float(t), dtype=torch.float32, device=p.device)]
    if scale is None:
        torch._fused_adam_([p], [g], [m], [v], [], step, lr=lr, beta1=b1, beta2=b2, weight_decay=0.0, eps=EPS,
                           amsgrad=False, maximize=False)
        return
    n = scale.numel()
    lrs = (scale.reshape(n) * lr).to(torch.float32)
    for i, (pi, gi, mi, vi) in enumerate(zip(p.view(n, -1), g.reshape(n, -1), m.view(n, -1), v.view(n, -1), strict=True)):
        torch._fused_adam_([pi], [gi], [mi], [vi], [], step, lr=lrs[i], beta1=b1, beta2=b2, weight_decay=0.0, eps=EPS,
                           amsgrad=False, maximize=False)


def _pin_in_place(t: torch.Tensor, owner: object) -> bool:
    """Page-lock a contiguous host tensor without copying it (pin_memory() would double the
    layer's host footprint); unregistered when `owner` is collected. False if it cannot be done."""
    try:
        cudart = torch.cuda.cudart()
        ptr, size = t.data_ptr(), t.numel() * t.element_size()
        if not t.is_contiguous() or size == 0 or int(cudart.cudaHostRegister(ptr, size, 0)) != 0:
            return False
        weakref.finalize(owner, cudart.cudaHostUnregister, ptr)
        return True
    except Exception:  # no CUDA runtime bindings: copies stay synchronous but correct
        return False


class Solver:
    per_expert: tuple[str, ...] = ()
    shared: tuple[str, ...] = ("B",)
    cost_kind = ""  # the row of cost.py that describes this solver's memory and FLOPs
    betas: tuple[float, float] = BETAS  # Adam's (β1, β2) for every parameter this solver steps

    def __init__(self, W: torch.Tensor | Targets, spec: MoBESpec, *, lr: float = 0.07,
                 device: str | torch.device = "cpu", expert_batch: int | None = None,
                 max_device_bytes: int | None = None, init: MoBEFactors | str = "paper", seed: int = 0,
                 tol: float | None = None, patience: int = 20, precision: str = "fp32",
                 metric: InputMetric | None = None, shard: ExpertShard | None = None, schedule: str = "constant",
                 total_steps: int | None = None):
        # seed: the clustered init's row sketch (the only random draw); kept in the state dict
        self.spec, self.lr, self.tol, self.patience, self.seed = spec, float(lr), tol, patience, seed
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; use one of {', '.join(SCHEDULES)}")
        # the step-size policy (schedule.py); `decay` needs the run's length, kept in the state dict
        self.schedule, self.total_steps = schedule, total_steps
        self.basis_step_cap: float | None = BASIS_STEP_CAP  # None in states from before the cap (schedule.py)
        self.device = torch.device(device)
        self.precision = Precision(precision, self.device)
        targets = Targets.of(W)
        E, p, d = targets.shape
        self.E, self.p, self.d, self.N = E, p, d, E * p * d  # N over all experts, sharded or not
        if shard is not None and shard.total != E:
            raise ValueError(f"expert shard is of {shard.total} experts, targets have {E}")
        self.shard = shard
        self.lo, self.hi = (0, E) if shard is None else (shard.lo, shard.hi)
        if metric is not None and (metric.num_experts, metric.diag.shape[1]) != (E, d):
            raise ValueError(f"input metric is for {metric.num_experts} experts of width {metric.diag.shape[1]}, "
                             f"targets are {E} x {p} x {d}")
        self.metric = None if metric is None else metric.slice(self.lo, self.hi).to(self.device)
        own = targets if shard is None else targets.slice(self.lo, self.hi)
        self.plan = self._plan(own, max_device_bytes, expert_batch)
        self.batch = max(1, self.plan.batch)  # a shard without experts plans a batch of 0
        self.home = self.device if self.plan.resident else torch.device("cpu")
        self.streaming = self.home != self.device
        self.T = own.to(self.home)
        # the init sees every expert (its bases come from all of them), then each process keeps its rows
        factors = initial_factors(self.T if shard is None else targets, spec, init, self.device, seed,
                                  need_A="A" in self.per_expert) if isinstance(init, str) else init
        self.params = self._params_from(factors)
        del factors
        if shard is not None:
            for k in self.per_expert:
                self.params[k] = self.params[k][self.lo:self.hi].clone()
            for k in self.shared:
                shard.broadcast(self.params[k])
        self.m = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.best = {k: v.clone() for k, v in self.params.items()}
        self.cand = {k: torch.empty_like(self.params[k]) for k in self.per_expert}
        self._side = None
        if self.streaming and self.device.type == "cuda":
            self._side = torch.cuda.Stream(self.device)
            self._pin_home()
        # the loss is only read on the host where that costs nothing or is needed anyway
        self.sync_each_step = self.device.type == "cpu" or self.streaming or tol is not None
        self.step_count = 0
        self._best_loss = torch.full((), math.inf, device=self.device)
        self._best_step = torch.zeros((), dtype=torch.int64, device=self.device)
        self._last_loss = torch.full((), math.inf, device=self.device)
        self.history: list[float] = []
        self.converged = False

    # -- subclass hooks
    def _params_from(self, factors: MoBEFactors) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _batch_loss(self, W: torch.Tensor, per: dict[str, torch.Tensor], B: torch.Tensor, idx: range) -> torch.Tensor:
        """Sum of squared residuals of a batch, differentiable w.r.t. per-expert params and B."""
        raise NotImplementedError

    def _batch_backward(self, W: torch.Tensor, per: dict[str, torch.Tensor], B: torch.Tensor, idx: range) -> torch.Tensor:
        """The batch's loss (detached), after adding d(loss / N)/d(param) to the .grad of the per-expert
        leaves and of B. Default: autograd through _batch_loss; a solver may write it by hand."""
        loss = self._batch_loss(W, per, B, idx)
        (loss / self.N).backward()
        return loss.detach()

    def best_factors(self) -> MoBEFactors:
        raise NotImplementedError

    # -- the objective's weighting (calibrated fits)
    def _metric_of(self, idx: range) -> InputMetric | None:
        return None if self.metric is None else self.metric.slice(idx.start - self.lo, idx.stop - self.lo)

    def _squared_error(self, R: torch.Tensor, idx: range) -> torch.Tensor:
        """Σ ||R_e||² over the batch, or Σ tr(R_e H_e R_eᵀ) in a calibrated fit."""
        H = self._metric_of(idx)
        return (R * R).sum() if H is None else H.quadratic(R)

    # -- host views of device scalars (reading them syncs)
    @property
    def best_loss(self) -> float:
        return float(self._best_loss)

    @property
    def last_loss(self) -> float:
        return float(self._last_loss)

    @property
    def best_step(self) -> int:
        """Step count at which the best iterate's parameters were current (0 = the init)."""
        return int(self._best_step)

    # -- mechanics
    def _plan(self, targets: Targets, max_device_bytes: int | None, expert_batch: int | None) -> MemoryPlan:
        budget = device_budget(self.device, max_device_bytes)
        return plan_memory(self.cost_kind, targets.shape[0], self.p, self.d, self.spec, targets.nbytes, self.device.type,
                           budget, expert_batch, None if self.metric is None else self.metric.rank, self.precision.name)

    def _home(self, name: str) -> torch.device:
        return self.home if name in self.per_expert else self.device

    def _pin_home(self) -> None:
        for t in self.T.tensors() + [d[k] for d in (self.params, self.m, self.v) for k in self.per_expert]:
            _pin_in_place(t, self)

    def _load(self, e0: int, e1: int) -> dict[str, torch.Tensor]:
        """A batch's targets, per-expert params and moments on the device (views when resident)."""
        dev = self.device
        stored = self.T.slice(e0, e1)
        out = {"W": stored.data.to(dev, non_blocking=True)}
        if stored.scale_inv is not None:
            out["W.scale_inv"] = stored.scale_inv.to(dev, non_blocking=True)
        for k in self.per_expert:
            out[k] = self.params[k][e0:e1].to(dev, non_blocking=True)
            out["m." + k] = self.m[k][e0:e1].to(dev, non_blocking=True)
            out["v." + k] = self.v[k][e0:e1].to(dev, non_blocking=True)
        return out

    def _prefetch(self, e0: int, e1: int):
        if self._side is None:
            return self._load(e0, e1)
        self._side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self._side):
            return self._load(e0, e1)

    def _take(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if self._side is not None:
            main = torch.cuda.current_stream(self.device)
            main.wait_stream(self._side)
            for t in batch.values():
                t.record_stream(main)  # allocated on the side stream, used (and freed) on the main one
        return batch

    def _work_dtype(self) -> torch.dtype:
        """Dtype of a batch's targets inside the step: fp32 unless a solver's step holds its
        intermediates narrower (als.py under bf16)."""
        return torch.float32

    def _targets(self, cur: dict[str, torch.Tensor]) -> torch.Tensor:
        """The batch's z-scored targets in the work dtype, made on the device from the stored copy."""
        return Targets(cur["W"], cur.get("W.scale_inv"), self.T.block, self.T.scale).batch(dtype=self._work_dtype())

    def step(self) -> torch.Tensor:
        """One full pass over all (this shard's) experts and one Adam update. Returns the loss of the
        parameters the pass started from as a 0-d device tensor (float() it to read; that syncs)."""
        t = self.step_count + 1
        dev = self.device
        lr = self.lr * lr_factor(self.schedule, t, self.total_steps)
        total = torch.zeros((), dtype=torch.float32, device=dev)
        # one leaf per shared tensor for the whole pass: backward() accumulates every batch's
        # gradient into its .grad (no second accumulator)
        leaves = {k: self.params[k].detach().requires_grad_(True) for k in self.shared}
        n = self.hi - self.lo  # local rows e0..e1 are experts lo+e0..lo+e1
        ranges = [(e0, min(n, e0 + self.batch)) for e0 in range(0, n, self.batch)]
        pending = self._prefetch(*ranges[0]) if ranges else {}
        with self.precision.active():
            for i, (e0, e1) in enumerate(ranges):
                cur = self._take(pending)
                if i + 1 < len(ranges):
                    pending = self._prefetch(*ranges[i + 1])
                per = {}
                for k in self.per_expert:
                    self.cand[k][e0:e1].copy_(self.params[k][e0:e1])
                    per[k] = cur[k].detach().requires_grad_(True)
                total += self._batch_backward(self._targets(cur), per, leaves["B"], range(self.lo + e0, self.lo + e1))
                with torch.no_grad():
                    for k in self.per_expert:
                        p_, m, v = per[k].detach(), cur["m." + k], cur["v." + k]
                        _adam_(p_, _grad(per[k]), m, v, lr, t, betas=self.betas)
                        if self.streaming:  # else p_, m, v alias the home tensors: updated in place
                            self.params[k][e0:e1].copy_(p_, non_blocking=True)
                            self.m[k][e0:e1].copy_(m, non_blocking=True)
                            self.v[k][e0:e1].copy_(v, non_blocking=True)
        if self.shard is not None:  # every process steps B with the whole gradient and reads the whole loss
            self.shard.all_reduce(total)
            for k in self.shared:
                if leaves[k].grad is None:  # a shard without experts
                    leaves[k].grad = torch.zeros_like(leaves[k])
                self.shard.all_reduce(_grad(leaves[k]))
        with torch.no_grad():
            loss_t = total / self.N
            self.step_count = t
            self._last_loss = loss_t
            # the shared tensors still hold the values the loss was measured at: track first, then step
            if self.sync_each_step:
                self._track_best_host(float(loss_t), t)  # also waits for the D2H copies of a streamed pass
            else:
                self._track_best_device(loss_t, t)
            for k in self.shared:  # the bases (the same scale on every shard: B is identical there)
                scale = basis_step_scale(self.schedule, self.params[k], self.basis_step_cap)
                _adam_(self.params[k], _grad(leaves[k]), self.m[k], self.v[k], lr, t, scale, self.betas)
        return loss_t

    def _track_best_host(self, loss: float, t: int) -> None:
        if loss < self.best_loss:  # NaN compares False: a non-finite iterate is never the best
            self._best_loss.fill_(loss)
            self._best_step.fill_(t - 1)
            for k in self.shared:
                self.best[k].copy_(self.params[k])
            for k in self.per_expert:  # cand holds the params this loss was measured at
                self.best[k], self.cand[k] = self.cand[k], self.best[k]
        if not math.isfinite(loss):
            return
        self.history.append(loss)
        del self.history[: -(self.patience + 1)]
        if self.tol is not None and len(self.history) > self.patience:
            old = self.history[0]
            self.converged = (old - loss) / max(old, 1e-30) < self.tol

    def _track_best_device(self, loss: torch.Tensor, t: int) -> None:
        better = loss < self._best_loss
        for k in self.best:
            torch.where(better, self.cand[k] if k in self.cand else self.params[k], self.best[k], out=self.best[k])
        self._best_loss = torch.where(better, loss, self._best_loss)
        self._best_step = torch.where(better, torch.full_like(self._best_step, t - 1), self._best_step)

    def run(self, steps: int, callback=None, should_stop=None, report_every: int = 10) -> None:
        """Up to `steps` steps; stops early on convergence, a non-finite loss (seen at a report or
        every step when the loss is read anyway), or when should_stop() says so (checked after every
        step, so each call makes progress). callback(step, loss, best_loss) every `report_every`."""
        for i in range(steps):
            loss_t = self.step()
            due = callback is not None and (self.step_count % report_every == 0 or i == steps - 1)
            if due or self.sync_each_step:
                loss = float(loss_t)
                if due or not math.isfinite(loss):
                    if callback is not None:
                        callback(self.step_count, loss, self.best_loss)
                if not math.isfinite(loss):
                    return
            if self.converged or (should_stop and should_stop()):
                return

    # -- exact state
    def _full(self, t: torch.Tensor) -> torch.Tensor:
        """A per-expert tensor with every expert's rows (gathered from the other processes when sharded)."""
        return t if self.shard is None else self.shard.gather(t)

    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        """(tensors: all CPU contiguous, meta: JSON-serialisable): everything the next step depends on.
        A sharded solver gathers its per-expert rows: the same state a single process would hold."""
        tensors = {}
        for k in self.params:
            full = self._full if k in self.per_expert else (lambda t: t)
            tensors[f"param.{k}"] = full(self.params[k].detach()).cpu().contiguous()
            tensors[f"m.{k}"] = full(self.m[k]).cpu().contiguous()
            tensors[f"v.{k}"] = full(self.v[k]).cpu().contiguous()
            tensors[f"best.{k}"] = full(self.best[k]).cpu().contiguous()
        meta = {"solver": type(self).__name__, "step": self.step_count, "best_loss": self.best_loss,
                "best_step": self.best_step, "last_loss": self.last_loss, "lr": self.lr, "seed": self.seed,
                "schedule": self.schedule, "total_steps": self.total_steps, "basis_step_cap": self.basis_step_cap,
                "history": self.history, "converged": self.converged,
                "shape": [self.E, self.p, self.d],
                "spec": [self.spec.num_bases, self.spec.rank, self.spec.activation, self.spec.groups]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        spec = [self.spec.num_bases, self.spec.rank, self.spec.activation, self.spec.groups]
        if meta.get("solver") != type(self).__name__ or meta.get("shape") != [self.E, self.p, self.d] \
                or meta.get("spec", spec) != spec:
            raise ValueError(f"solver state is for {meta.get('solver')} {meta.get('shape')} {meta.get('spec')}, not "
                             f"{type(self).__name__} {[self.E, self.p, self.d]} {spec}")
        for k in self.params:  # a sharded solver takes its own rows of the per-expert state
            own = slice(self.lo, self.hi) if k in self.per_expert else slice(None)
            self.params[k] = tensors[f"param.{k}"][own].to(self._home(k)).clone()
            self.m[k] = tensors[f"m.{k}"][own].to(self._home(k)).clone()
            self.v[k] = tensors[f"v.{k}"][own].to(self._home(k)).clone()
            self.best[k] = tensors[f"best.{k}"][own].to(self._home(k)).clone()
            if k in self.cand:
                self.cand[k] = torch.empty_like(self.params[k])
        if self._side is not None:
            self._pin_home()
        self.step_count = int(meta["step"])
        self._best_step = torch.tensor(int(meta["best_step"]), device=self.device)
        self._best_loss = torch.tensor(float(meta["best_loss"]), device=self.device)
        self._last_loss = torch.tensor(float(meta["last_loss"]), device=self.device)
        self.lr = float(meta["lr"])
        # states written before schedules existed stepped with a constant lr
        self.schedule, self.total_steps = meta.get("schedule", "constant"), meta.get("total_steps")
        # states written before the cap stepped their bases uncapped: a resumed run keeps its arithmetic
        self.basis_step_cap = meta.get("basis_step_cap")
        self.history, self.converged = list(meta["history"]), bool(meta["converged"])
