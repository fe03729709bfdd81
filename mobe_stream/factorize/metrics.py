"""Reconstruction error and parameter budgets."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .cost import plan_memory
from .model import MoBEFactors, MoBESpec
from .targets import Targets

if TYPE_CHECKING:
    from .baselines import LowRankFactors


def relative_error(W: torch.Tensor | Targets, factors: MoBEFactors | LowRankFactors,
                   expert_batch: int | None = None, device: str | torch.device = "cpu") -> float:
    """||W - Ŵ||_F / ||W||_F over the whole layer, a batch of experts at a time (default: about
    64 MiB of reconstruction per batch) so it never builds a second full-layer tensor. On a GPU
    `device` (MoBE factors: the bases move once, A a batch at a time): for Kimi-K2 a projection's
    reconstruction is 23 TFLOP, minutes on a CPU."""
    T = Targets.of(W)
    E, p, d = T.shape
    expert_batch = expert_batch or max(1, (64 * 2**20) // (4 * p * d))
    device = torch.device(device)
    if isinstance(factors, MoBEFactors) and device.type != "cpu":
        factors = MoBEFactors(factors.A, factors.B.to(device), factors.alpha, factors.scale, factors.activation)
    else:
        device = torch.device("cpu")
    num = den = 0.0
    for e0 in range(0, E, expert_batch):
        e1 = min(E, e0 + expert_batch)
        idx = torch.arange(e0, e1)
        Wb = T.slice(e0, e1).to(device).batch()
        num += float(((factors.reconstruct(idx) - Wb) ** 2).sum())
        den += float((Wb**2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def param_fraction(E: int, p: int, d: int, m: int, r: int) -> float:
    """Parameters of a gate+up+down MoE layer after MoBE of gate and up, as a fraction of before
    (α ignored): 1/3 + 2r/(3d) + 2mr/(3Ep)."""
    return 1 / 3 + 2 * r / (3 * d) + 2 * m * r / (3 * E * p)


def expert_cut(E: int, p: int, d: int, m: int, r: int) -> float:
    """Exact fraction of gate/up/down expert parameters removed (α included)."""
    before = 3 * E * p * d
    after = E * p * d + 2 * (E * p * r + m * r * d + E * m)
    return 1 - after / before


DEFAULT_REDUCTION = 0.25  # the paper's Qwen3/Kimi-K2 operating point


def choose_bases_rank(E: int, p: int, d: int, reduction: float | None = None, groups: int = 1,
                      rank: int | None = None, num_bases: int | None = None) -> tuple[int, int]:
    """(m, r) for a layer of E experts of p x d; the one place the setting is decided.

    - m and r given: taken as they are (checked).
    - m given, no reduction: r = p, as in the paper (the cut is whatever m gives).
    - otherwise the target cut (`reduction`, default 0.25) decides: the paper's r = p (or the given
      r) with the most bases that still meet it (more bases = lower error); r is lowered only when
      even m = groups cannot meet it.
    Always terminates: m grows by `groups` (>= 1) up to E; a setting that adds parameters is refused.
    """
    if groups < 1 or E % groups:
        raise ValueError(f"--groups {groups} must be >= 1 and divide the number of experts ({E})")
    for name, value in (("num_bases", num_bases), ("rank", rank)):
        if value is not None and value < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if num_bases is not None and num_bases % groups:
        raise ValueError(f"--num-bases {num_bases} must be a multiple of --groups {groups}")
    if num_bases is not None and num_bases > E:
        raise ValueError(f"--num-bases {num_bases} is more than the {E} experts per layer")
    if num_bases is not None and (rank is not None or reduction is None):
        r = rank if rank is not None else p
        if expert_cut(E, p, d, num_bases, r) <= 0:
            raise ValueError(f"{num_bases} bases of rank {r} would not remove any expert parameters "
                             f"(E={E}, p={p}, d={d}); use fewer bases or a lower --rank")
        return num_bases, r
    target = DEFAULT_REDUCTION if reduction is None else reduction
    if not 0 < target < 1:
        raise ValueError(f"reduction must be between 0 and 1, got {target}")
    ranks = [rank] if rank else [p] + [x for x in (p * 3 // 4, p // 2, p // 4, p // 8) if x >= 1]
    for r in ranks:
        if num_bases:
            if expert_cut(E, p, d, num_bases, r) >= target - 1e-12:
                return num_bases, r
            continue
        best = None
        m = groups
        while m <= E and expert_cut(E, p, d, m, r) >= target - 1e-12:
            best = m
            m += groups
        if best is not None:
            return best, r
    raise ValueError(f"cannot cut {target:.0%} of expert parameters with "
                     f"{'rank ' + str(rank) if rank else 'any rank'}"
                     f"{' and ' + str(num_bases) + ' bases' if num_bases else ''} "
                     f"(E={E}, p={p}, d={d}, groups={groups}); lower --reduction or --rank")


def working_set_bytes(E: int, p: int, d: int, m: int, r: int, groups: int = 1, device: str = "cpu",
                      solver: str = "als", target_bytes: int | None = None, budget: int | None = None,
                      precision: str = "fp32") -> dict[str, int]:
    """Peak bytes of one projection's fit: host (targets as stored, state kept on the host, the CPU
    batch, or the init's sketch and SVD input) and device (cost.plan_memory; on the CPU: what a
    device would need to hold everything). `target_bytes` default: fp32 targets."""
    spec = MoBESpec(m, r, "silu", groups)
    tb = 4 * E * p * d if target_bytes is None else target_bytes
    cpu = plan_memory(solver, E, p, d, spec, tb, "cpu", precision=precision)
    init = tb + 4 * E * min(64, p) * d + (4 * E * p * r if solver == "adam" else 0)  # sketches, SVD'd A
    if device == "cpu":
        return {"host": int(max(cpu.host_bytes, init)), "device": int(cpu.host_bytes)}
    if budget is None:  # resident (the usual case on a big card): the host keeps the targets for the init
        return {"host": int(init), "device": int(plan_memory(solver, E, p, d, spec, tb, device, 1 << 62,
                                                                     precision=precision).device_bytes)}
    dev = plan_memory(solver, E, p, d, spec, tb, device, budget, precision=precision)
    return {"host": int(max(dev.host_bytes + tb, init)), "device": int(dev.device_bytes)}
