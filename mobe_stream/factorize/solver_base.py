"""What every MoBE solver shares: expert batching through the device, Adam updates, best-iterate
tracking, convergence stopping and an exact, pickle-free state dict.

One step is one full pass over all experts. Per-expert parameters (A_e, α_e) and their Adam moments
live on the "home" device (the compute device when everything fits, else host memory) and travel
with their batch; the shared bases B stay on the compute device and their gradient accumulates over
the pass. Adam is elementwise and per-expert parameters only get gradient from their own expert, so
updating them batch by batch equals the full-batch update; only B's gradient summation order
depends on the batch size (results then agree to float rounding).
"""

from __future__ import annotations

import math

import torch

from .init import init_grouped_svd
from .model import MoBEFactors, MoBESpec

BETAS = (0.9, 0.999)
EPS = 1e-8
CPU_BATCH_BYTES = 256 * 2**20  # CPU temporaries per batch: fixed, so results never depend on free RAM


def _adam_(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, lr: float, t: int) -> None:
    b1, b2 = BETAS
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    denom = (v / (1 - b2**t)).sqrt_().add_(EPS)
    p.addcdiv_(m, denom, value=-lr / (1 - b1**t))


def batch_bytes_per_expert(p: int, d: int, r: int) -> int:
    """Device bytes one expert needs during a step (targets, mixed basis + pre-activation,
    residual, their gradients, A and its moments), fp32."""
    return 4 * (2 * p * d + 4 * r * d + 6 * p * r)


class Solver:
    per_expert: tuple[str, ...] = ()
    shared: tuple[str, ...] = ("B",)

    def __init__(self, W: torch.Tensor, spec: MoBESpec, *, lr: float = 0.07, device: str | torch.device = "cpu",
                 expert_batch: int | None = None, max_device_bytes: int | None = None, init: MoBEFactors | None = None,
                 seed: int = 0, tol: float | None = None, patience: int = 20):
        torch.manual_seed(seed)
        self.spec, self.lr, self.tol, self.patience, self.seed = spec, float(lr), tol, patience, seed
        self.device = torch.device(device)
        E, p, d = W.shape
        self.E, self.p, self.d, self.N = E, p, d, E * p * d
        self.batch = max(1, min(E, expert_batch or self._auto_batch(max_device_bytes)))
        self.home = self.device if self.batch >= E else torch.device("cpu")
        if self.home.type == "cpu" and self.device.type == "cuda":
            W = W.pin_memory()
        self.W = W.to(self.home, torch.float32)
        factors = init or init_grouped_svd(W, spec, device=self.device)
        self.params = self._params_from(factors)
        self.m = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.v = {k: torch.zeros_like(v) for k, v in self.params.items()}
        self.best = {k: v.clone() for k, v in self.params.items()}
        self.cand = {k: torch.empty_like(v) for k, v in self.params.items()}
        self.step_count = 0
        self.best_loss = math.inf
        self.best_step = 0
        self.last_loss = math.inf
        self.history: list[float] = []
        self.converged = False

    # -- subclass hooks
    def _params_from(self, factors: MoBEFactors) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _batch_loss(self, W: torch.Tensor, per: dict[str, torch.Tensor], B: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        """Sum of squared residuals of a batch, differentiable w.r.t. per-expert params and B."""
        raise NotImplementedError

    def best_factors(self) -> MoBEFactors:
        raise NotImplementedError

    # -- mechanics
    def _auto_batch(self, max_device_bytes: int | None) -> int:
        E, p, d, r = self.E, self.p, self.d, self.spec.rank
        per = batch_bytes_per_expert(p, d, r)
        if max_device_bytes is None:
            if self.device.type == "cuda":
                free, _ = torch.cuda.mem_get_info(self.device)
                max_device_bytes = int(free * 0.9)
            else:
                return max(1, CPU_BATCH_BYTES // per)
        shared = 5 * 4 * self.spec.num_bases * r * d
        return max(1, (max_device_bytes - shared) // per)

    def _home(self, name: str) -> torch.device:
        return self.home if name in self.per_expert else self.device

    def step(self) -> float:
        t = self.step_count + 1
        dev = self.device
        total = torch.zeros((), dtype=torch.float32, device=dev)
        B = {k: self.params[k] for k in self.shared}
        gB = {k: torch.zeros_like(v) for k, v in B.items()}
        for e0 in range(0, self.E, self.batch):
            e1 = min(self.E, e0 + self.batch)
            idx = torch.arange(e0, e1, device=dev)
            per = {}
            for k in self.per_expert:
                self.cand[k][e0:e1].copy_(self.params[k][e0:e1])
                per[k] = self.params[k][e0:e1].to(dev, non_blocking=True).detach().requires_grad_(True)
            Bg = {k: v.detach().requires_grad_(True) for k, v in B.items()}
            Wb = self.W[e0:e1].to(dev, non_blocking=True)
            loss = self._batch_loss(Wb, per, Bg["B"], idx)
            (loss / self.N).backward()
            total += loss.detach()
            for k in self.shared:
                gB[k] += Bg[k].grad
            with torch.no_grad():
                for k in self.per_expert:
                    m = self.m[k][e0:e1].to(dev, non_blocking=True)
                    v = self.v[k][e0:e1].to(dev, non_blocking=True)
                    p_ = per[k].detach()
                    _adam_(p_, per[k].grad, m, v, self.lr, t)
                    if self.home != dev:  # else p_, m, v alias the home tensors: updated in place
                        self.params[k][e0:e1].copy_(p_, non_blocking=True)
                        self.m[k][e0:e1].copy_(m, non_blocking=True)
                        self.v[k][e0:e1].copy_(v, non_blocking=True)
        with torch.no_grad():
            for k in self.shared:
                self.cand[k].copy_(self.params[k])
                _adam_(self.params[k], gB[k], self.m[k], self.v[k], self.lr, t)
        loss = float(total) / self.N  # the one host sync per step (best-iterate bookkeeping)
        if not math.isfinite(loss):
            # never accept a non-finite iterate as best; the caller rolls back (see pipeline)
            self.step_count, self.last_loss = t, loss
            return loss
        if loss < self.best_loss:
            self.best_loss, self.best_step = loss, t - 1
            self.best, self.cand = self.cand, self.best  # cand holds the params this loss was measured at
        self.step_count, self.last_loss = t, loss
        self.history.append(loss)
        del self.history[: -(self.patience + 1)]
        if self.tol is not None and len(self.history) > self.patience:
            old = self.history[0]
            self.converged = (old - loss) / max(old, 1e-30) < self.tol
        return loss

    def run(self, steps: int, callback=None, should_stop=None, report_every: int = 10) -> None:
        """Up to `steps` steps; stops early on convergence or when should_stop() says so (checked
        after every step, so each call makes progress)."""
        for i in range(steps):
            loss = self.step()
            if callback and (self.step_count % report_every == 0 or i == steps - 1 or not math.isfinite(loss)):
                callback(self.step_count, loss, self.best_loss)
            if self.converged or not math.isfinite(loss) or (should_stop and should_stop()):
                return

    # -- exact state
    def state_dict(self) -> tuple[dict[str, torch.Tensor], dict]:
        tensors = {}
        for k in self.params:
            tensors[f"param.{k}"] = self.params[k].detach().cpu().contiguous()
            tensors[f"m.{k}"] = self.m[k].cpu().contiguous()
            tensors[f"v.{k}"] = self.v[k].cpu().contiguous()
            tensors[f"best.{k}"] = self.best[k].cpu().contiguous()
        meta = {"solver": type(self).__name__, "step": self.step_count, "best_loss": self.best_loss,
                "best_step": self.best_step, "last_loss": self.last_loss, "lr": self.lr,
                "history": self.history, "converged": self.converged,
                "shape": [self.E, self.p, self.d], "spec": [self.spec.num_bases, self.spec.rank, self.spec.activation, self.spec.groups]}
        return tensors, meta

    def load_state_dict(self, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        if meta.get("solver") != type(self).__name__ or meta.get("shape") != [self.E, self.p, self.d]:
            raise ValueError(f"solver state is for {meta.get('solver')} {meta.get('shape')}, not {type(self).__name__} "
                             f"{[self.E, self.p, self.d]}")
        for k in self.params:
            self.params[k] = tensors[f"param.{k}"].to(self._home(k)).clone()
            self.m[k] = tensors[f"m.{k}"].to(self._home(k)).clone()
            self.v[k] = tensors[f"v.{k}"].to(self._home(k)).clone()
            self.best[k] = tensors[f"best.{k}"].to(self._home(k)).clone()
            self.cand[k] = torch.empty_like(self.params[k])
        self.step_count, self.best_step = int(meta["step"]), int(meta["best_step"])
        self.best_loss, self.last_loss, self.lr = float(meta["best_loss"]), float(meta["last_loss"]), float(meta["lr"])
        self.history, self.converged = list(meta["history"]), bool(meta["converged"])
