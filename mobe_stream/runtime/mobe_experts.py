"""MoBE experts: gate/up weights rebuilt from shared bases, only for the experts a forward routes to.

    M_e = act(sum_i softmax(alpha_e)_i B[g(e), i])      [r, d], in fp32
    gate_e(x) = (x M_e^T) A_e^T                          never forms W_e = A_e M_e

The reference code mixes bases for all E experts on every call; routing picks top_k of them, so
building only the routed ones saves (E - routed) / E of that work. Mixed bases can be kept in a
byte-bounded LRU (`--mobe-cache`) shared by all layers, for decode where the same experts recur.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checkpoint.families import EXPERTS_MODULE as EXPERTS
from ..checkpoint.mobe_format import PROJECTIONS as PROJS
from ..checkpoint.mobe_format import factor_name
from ..factorize.model import mixed_bases
from .lru import ByteLRU
from .moe import OriginalExperts
from .ops import swiglu
from .unit_weights import UnitWeights


class MixedBasisCache(ByteLRU[torch.Tensor]):
    """LRU of mixed bases M_e keyed by (layer, proj, expert), bounded in bytes (0 = off)."""

    def put(self, key: tuple[int, str, int], t: torch.Tensor) -> None:  # type: ignore[override]
        super().put(key, t, t.numel() * t.element_size())


class MobeExperts(OriginalExperts):
    """gate/up from (A, B, alpha) of one layer; down_proj as stored (per expert or fused)."""

    def __init__(self, w: UnitWeights, p: int, layout: str, layer: int, act: str,
                 cache: MixedBasisCache | None = None, materialize_all: bool = False):
        super().__init__(w, p, layout)
        self.layer, self.act, self.cache, self.materialize_all = layer, act, cache, materialize_all
        self.A_name = {pr: factor_name(EXPERTS, pr, "mobe_A") for pr in PROJS}  # read per routed expert
        self.B = {pr: w[factor_name(EXPERTS, pr, "mobe_B")] for pr in PROJS}
        self.alpha = {pr: w[factor_name(EXPERTS, pr, "mobe_alpha")] for pr in PROJS}
        self.num_experts = self.alpha["gate_proj"].shape[0]
        self.M: dict[tuple[str, int], torch.Tensor] = {}
        self.mixed = 0  # bases mixed so far (for benchmarks)

    def prepare(self, experts: list[int]) -> None:
        """Mix bases for the routed experts (all E when materialize_all, like the reference code)."""
        super().prepare(experts)
        self.M = {}
        want = list(range(self.num_experts)) if self.materialize_all else experts
        dtype = self.B["gate_proj"].dtype
        for pr in PROJS:
            todo = []
            for e in want:
                hit = self.cache.get((self.layer, pr, e)) if self.cache is not None else None
                if hit is None:
                    todo.append(e)
                else:
                    self.M[pr, e] = hit
            if not todo:
                continue
            ids = torch.tensor(todo)
            mixed = mixed_bases(self.alpha[pr][ids.to(self.alpha[pr].device)], self.B[pr], ids, self.num_experts,
                                self.act).to(dtype)
            self.mixed += len(todo)
            for e, m in zip(todo, mixed, strict=True):
                self.M[pr, e] = m
                if self.cache is not None:
                    self.cache.put((self.layer, pr, e), m.clone() if len(todo) > 1 else m)

    def gate_up(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed W_e = A_e M_e (only used by tests and tools; the forward stays factored)."""
        return tuple(self.w.expert(self.A_name[pr], e) @ self.M[pr, e] for pr in PROJS)  # type: ignore[return-value]

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        g = F.linear(F.linear(x, self.M["gate_proj", e]), self.w.expert(self.A_name["gate_proj"], e))
        u = F.linear(F.linear(x, self.M["up_proj", e]), self.w.expert(self.A_name["up_proj"], e))
        return F.linear(F.silu(g) * u, self.down(e))


class LowRankExperts(OriginalExperts):
    """Baseline checkpoints (`--method svd|delta`): gate/up = [W̄_g(e) +] U_e V_e, applied factored."""

    def __init__(self, w: UnitWeights, p: int, layout: str):
        super().__init__(w, p, layout)
        self.U = {pr: factor_name(EXPERTS, pr, "lowrank_U") for pr in PROJS}  # read per routed expert
        self.V = {pr: factor_name(EXPERTS, pr, "lowrank_V") for pr in PROJS}
        self.mean = {pr: w.get(factor_name(EXPERTS, pr, "lowrank_mean")) for pr in PROJS}
        E = w.shape(self.U["gate_proj"])[0]
        G = 1 if self.mean["gate_proj"] is None else self.mean["gate_proj"].shape[0]
        self.per_group = E // G

    def _proj(self, pr: str, e: int, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(F.linear(x, self.w.expert(self.V[pr], e)), self.w.expert(self.U[pr], e))
        mean = self.mean[pr]
        if mean is not None:
            y = y + F.linear(x, mean[e // self.per_group])
        return y

    def gate_up(self, e: int) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for pr in PROJS:
            W = self.w.expert(self.U[pr], e) @ self.w.expert(self.V[pr], e)
            mean = self.mean[pr]
            out.append(W if mean is None else W + mean[e // self.per_group])
        return out[0], out[1]

    def __call__(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(self._proj("gate_proj", e, x)) * self._proj("up_proj", e, x), self.down(e))


__all__ = ["LowRankExperts", "MixedBasisCache", "MobeExperts", "swiglu"]
