"""Baselines at the parameter budget of a MoBE setting, so methods compare at equal size.

    svd    W_e ≈ U_e V_e              per-expert truncated SVD, rank k
    delta  W_e ≈ W̄_g + U_e V_e        mean of the expert's group plus a rank-k SVD of the residual
                                      (D2-MoE's shape without its calibration data / Fisher weights)
    molae  W_e ≈ A_e B_g              one shared basis per group, no activation: MoBE with m = G and
                                      the identity. The grouped SVD of the stacked [E_g·p, d] matrix is
                                      its exact optimum (Eckart-Young), so it needs no solver.

Each rank is the largest whose parameters fit the budget E·p·r + m·r·d + E·m/G of the MoBE
setting it is compared with. All fits are closed form, batched over experts, and device-agnostic.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .init import init_grouped_svd
from .model import MoBEFactors, MoBESpec

METHODS = ("mobe", "svd", "molae", "delta")


@dataclass(frozen=True)
class MethodPlan:
    """What one compressed projection stores: method, rank, bases and groups."""

    method: str
    rank: int
    num_bases: int
    groups: int
    activation: str

    def shapes(self, E: int, p: int, d: int) -> dict[str, tuple[int, ...]]:
        """Stored tensor suffix -> shape for one projection of one layer."""
        r, G = self.rank, self.groups
        if self.method in ("mobe", "molae"):
            mg = self.num_bases // G
            return {"mobe_A": (E, p, r), "mobe_B": (G, mg, r, d), "mobe_alpha": (E, mg)}
        shapes: dict[str, tuple[int, ...]] = {"lowrank_U": (E, p, r), "lowrank_V": (E, r, d)}
        if self.method == "delta":
            shapes["lowrank_mean"] = (G, p, d)
        return shapes

    def params(self, E: int, p: int, d: int) -> int:
        total = 0
        for shape in self.shapes(E, p, d).values():
            n = 1
            for s in shape:
                n *= s
            total += n
        return total

    def config(self) -> dict:
        return {"method": self.method, "num_bases": self.num_bases, "rank": self.rank, "groups": self.groups,
                "activation": self.activation}

    @classmethod
    def from_config(cls, block: dict) -> MethodPlan:
        return cls(block.get("method", "mobe"), int(block["rank"]), int(block["num_bases"]), int(block["groups"]),
                   block.get("activation", "silu"))


def plan_method(method: str, E: int, p: int, d: int, spec: MoBESpec) -> MethodPlan:
    """The `method` setting with at most the parameters of MoBE `spec` on [E, p, d] experts."""
    G = spec.groups
    mobe = MethodPlan("mobe", spec.rank, spec.num_bases, G, spec.activation)
    if method == "mobe":
        return mobe
    budget = mobe.params(E, p, d)
    if method == "svd":
        rank, plan = budget // (E * (p + d)), lambda k: MethodPlan("svd", k, 0, 1, "identity")
    elif method == "delta":
        rank, plan = (budget - G * p * d) // (E * (p + d)), lambda k: MethodPlan("delta", k, 0, G, "identity")
    elif method == "molae":
        rank, plan = (budget - E) // (E * p + G * d), lambda k: MethodPlan("molae", k, G, G, "identity")
    else:
        raise ValueError(f"unknown method {method!r}; use one of {', '.join(METHODS)}")
    rank = min(rank, p, d)
    if rank < 1:
        raise ValueError(f"method {method}: the budget of {budget} parameters per projection leaves no rank "
                         f"(E={E}, p={p}, d={d}, groups={G}); raise --rank/--num-bases or lower --reduction")
    return plan(rank)


@dataclass
class LowRankFactors:
    U: torch.Tensor  # [E, p, k]
    V: torch.Tensor  # [E, k, d]
    mean: torch.Tensor | None = None  # [G, p, d]
    scale: float = 1.0

    @property
    def num_experts(self) -> int:
        return self.U.shape[0]

    def reconstruct(self, experts: torch.Tensor | None = None) -> torch.Tensor:
        """scale · (W̄_g(e) + U_e V_e) for the given experts (all by default): [k, p, d] in fp32."""
        E = self.num_experts
        idx = torch.arange(E) if experts is None else torch.as_tensor(experts).reshape(-1)
        W = torch.bmm(self.U[idx].float(), self.V[idx].float())
        if self.mean is not None:
            G = self.mean.shape[0]
            W += self.mean.float()[idx // (E // G)]
        return self.scale * W


def _batch(p: int, d: int, max_bytes: int = 256 * 2**20) -> int:
    return max(1, max_bytes // (4 * p * d * 3))  # input, U·S and Vh of one batch


def fit_lowrank(W: torch.Tensor, rank: int, groups: int = 1, with_mean: bool = False,
                device: str | torch.device = "cpu") -> LowRankFactors:
    """Per-expert truncated SVD of W_e (minus its group mean when `with_mean`), batched over experts."""
    E, p, d = W.shape
    if E % groups:
        raise ValueError(f"{E} experts cannot be split into {groups} groups")
    mean = None
    if with_mean:
        mean = torch.stack([W[g * E // groups:(g + 1) * E // groups].to(device, torch.float32).mean(0).cpu()
                            for g in range(groups)])
    U = torch.empty((E, p, rank), dtype=torch.float32)
    V = torch.empty((E, rank, d), dtype=torch.float32)
    step = _batch(p, d)
    for e0 in range(0, E, step):
        idx = torch.arange(e0, min(E, e0 + step))
        Wb = W[idx].to(device, torch.float32)
        if mean is not None:
            Wb = Wb - mean[idx // (E // groups)].to(device)
        u, s, vh = torch.linalg.svd(Wb, full_matrices=False)
        U[idx] = (u[..., :rank] * s[:, None, :rank]).cpu()
        V[idx] = vh[:, :rank].cpu()
    return LowRankFactors(U, V, mean)


def fit_baseline(W: torch.Tensor, plan: MethodPlan, device: str | torch.device = "cpu") -> MoBEFactors | LowRankFactors:
    """Closed-form fit of a baseline method on (z-scored) targets W [E, p, d]."""
    if plan.method == "molae":
        return init_grouped_svd(W, MoBESpec(plan.groups, plan.rank, "identity", plan.groups), device)
    if plan.method in ("svd", "delta"):
        return fit_lowrank(W, plan.rank, plan.groups, with_mean=plan.method == "delta", device=device)
    raise ValueError(f"{plan.method} is not a closed-form baseline")


def factors_from_tensors(plan: MethodPlan, tensors: dict[str, torch.Tensor]) -> MoBEFactors | LowRankFactors:
    """Rebuild factors from stored tensors keyed by suffix (mobe_A, lowrank_U, ...)."""
    if plan.method in ("mobe", "molae"):
        return MoBEFactors(tensors["mobe_A"], tensors["mobe_B"], tensors["mobe_alpha"], 1.0, plan.activation)
    return LowRankFactors(tensors["lowrank_U"], tensors["lowrank_V"], tensors.get("lowrank_mean"))
