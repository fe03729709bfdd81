"""MoBE experts: gate/up weights rebuilt from shared bases, only for the experts a forward routes to.

    M_e = act(sum_i softmax(alpha_e)_i B[g(e), i])      [r, d], in fp32, kept in the compute dtype
    gate_e(x) = (x M_e^T) A_e^T                          factored: C (r d + r p) per expert of C rows
    gate_e(x) = x (A_e M_e)^T                            materialised: p r d + C p d

Per forward and per batch of experts with similar token counts (moe.expert_batches), the cheaper
form is chosen from the rows C each expert sees: materialise when C >= materialize_threshold(p, r,
d) (the FLOP crossover p r d / (r (d + p) - p d), times a factor measured by tools/bench_generate.py
--crossover; never at r < p d / (d + p), where the factored form is always cheaper). A decode step
(C = 1) and short prompts stay factored; long prefills materialise the experts they use heavily,
which is what the reference code does for every expert on every call.

Mixing costs m r d per expert and projection (m bases), far more than applying the expert to one
token (r d + r p), so a decode step would be dominated by it: the mixed bases of the routed experts
go into a byte-bounded LRU (`--mobe-cache`, shared by all layers, default `auto`), and only the
misses are mixed, in one batched call per expert batch (`mixed_bases`). The reference code mixes all
E experts on every call; building only the routed ones saves (E - routed) / E of that work.
"""

from __future__ import annotations

import math

import torch

from ..checkpoint.families import EXPERTS_MODULE as EXPERTS
from ..checkpoint.mobe_format import PROJECTIONS as PROJS
from ..checkpoint.mobe_format import factor_name
from ..factorize.model import mixed_bases_as
from .lru import ByteLRU
from .moe import ExpertMath, OriginalExperts
from .unit_weights import UnitWeights

MIX_BYTES = 512 * 2**20  # fp32 mixing temporaries of one expert batch (Kimi-K2: 4 experts of 2 x 2048 x 7168)
CROSSOVER_FACTOR = 1.0   # measured: tools/bench_generate.py --crossover (see materialize_threshold)


def materialize_threshold(p: int, r: int, d: int, factor: float | None = None) -> float:
    """Rows per expert from which A_e M_e is formed before applying: materialising costs p r d once
    and saves C (r (d + p) - p d) against the factored form (inf when the factored form is never
    dearer, r (d + p) <= p d)."""
    saved_per_row = r * (d + p) - p * d
    factor = CROSSOVER_FACTOR if factor is None else factor
    return math.inf if saved_per_row <= 0 else factor * p * r * d / saved_per_row


AUTO_CACHE_SHARE = 0.25  # `--mobe-cache auto`: at most this share of the compute device's free memory


def all_bases_bytes(mobe: dict, num_experts: int, hidden: int, dtype: torch.dtype) -> int:
    """Bytes of every expert's mixed bases in every MoBE layer (what a cache holding all would use;
    at r = p as many as the original gate/up weights in `dtype`)."""
    return len(mobe["layers"]) * num_experts * len(PROJS) * mobe["rank"] * hidden * dtype.itemsize


def auto_cache_bytes(total: int, device: torch.device) -> int:
    """`--mobe-cache auto`: all mixed bases when they take at most AUTO_CACHE_SHARE of the compute
    device's free memory now (weights loaded), else that share."""
    if device.type == "cuda":
        free = torch.cuda.mem_get_info(device)[0]
    else:
        import psutil

        free = psutil.virtual_memory().available
    return int(min(total, AUTO_CACHE_SHARE * free))


class MixedBasisCache(ByteLRU[torch.Tensor]):
    """LRU of mixed bases keyed (layer, expert): [2r, d], gate rows then up rows, bounded in bytes."""

    def put(self, key: tuple[int, int], t: torch.Tensor) -> None:  # type: ignore[override]
        super().put(key, t, t.numel() * t.element_size())

    def stats(self) -> dict:
        looked = self.hits + self.misses
        return {"hits": self.hits, "misses": self.misses, "hit_rate": self.hits / looked if looked else 0.0,
                "evictions": self.evictions, "cache_bytes": self.bytes, "cache_max_bytes": self.max_bytes,
                "cached_experts": len(self)}


class MobeExperts(OriginalExperts):
    """gate/up from (A, B, alpha) of one layer; down_proj as stored (per expert or fused)."""

    def __init__(self, w: UnitWeights, p: int, math: ExpertMath, layer: int, act: str,
                 cache: MixedBasisCache | None = None, materialize_all: bool = False):
        B_name = {pr: factor_name(EXPERTS, pr, "mobe_B") for pr in PROJS}
        super().__init__(w, p, math, w.tensors[B_name["gate_proj"]].shape[-1])
        self.layer, self.act, self.cache, self.materialize_all = layer, act, cache, materialize_all
        self.A_name = {pr: factor_name(EXPERTS, pr, "mobe_A") for pr in PROJS}  # read per routed expert
        self.B = {pr: w.tensors[B_name[pr]] for pr in PROJS}  # as stored: read chunk by chunk when mixing
        self.B_scale = {pr: w.scales.get(B_name[pr]) for pr in PROJS}
        self.alpha = {pr: w[factor_name(EXPERTS, pr, "mobe_alpha")] for pr in PROJS}
        self.num_experts = self.alpha["gate_proj"].shape[0]
        _, _, self.r, d = self.B["gate_proj"].shape
        self.threshold = 0.0 if materialize_all else materialize_threshold(p, self.r, d)
        self.mix_batch = max(1, MIX_BYTES // (len(PROJS) * 2 * self.r * d * 4))  # fp32 pre-activation + result
        self.max_batch = min(self.max_batch, self.mix_batch)
        self.ready: torch.Tensor | None = None  # mixed bases of this forward's experts, row slot[e] for expert e
        self.slot: torch.Tensor | None = None
        self.mixed = 0  # bases mixed so far (for benchmarks and tests)

    def prepare(self, experts: list[int]) -> None:
        """Fetch the routed experts' stored factors and, when their mixing temporaries fit in
        MIX_BYTES, get the mixed bases of all of them now: one mixing call for the forward's misses
        instead of one per expert batch (each call re-reads the layer's bases). With materialize_all
        (the reference code's way, for comparisons) all E experts are mixed."""
        super().prepare(experts)
        self.ready, self.slot = None, None
        if self.materialize_all:
            experts = list(range(self.num_experts))
        elif len(experts) > self.mix_batch:
            return  # a prefill at scale: mixed batch by batch in apply
        ids = torch.tensor(experts, dtype=torch.long)
        self.ready = self._mixed(ids)
        self.slot = torch.full((self.num_experts,), -1, dtype=torch.long)
        self.slot[ids] = torch.arange(len(experts))

    def _mix(self, ids: torch.Tensor) -> torch.Tensor:
        """Mixed bases of experts ids: [n, 2r, d] in the compute dtype."""
        B = self.B["gate_proj"]
        out = torch.empty((len(ids), len(PROJS) * self.r, B.shape[-1]), dtype=self.w.dtype, device=B.device)
        for j, pr in enumerate(PROJS):
            mixed_bases_as(self.alpha[pr][ids.to(self.alpha[pr].device)], self.B[pr], ids, self.num_experts, self.act,
                           self.w.dtype, out=out[:, j * self.r:(j + 1) * self.r], scale=self.B_scale[pr],
                           block=self.w.block)
        self.mixed += len(PROJS) * len(ids)
        return out

    def _mixed(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, 2r, d] for experts ids: from the cache where held, the misses mixed in one call."""
        if self.cache is None:
            return self._mix(ids)
        es = ids.tolist()
        got = [self.cache.get((self.layer, e)) for e in es]
        miss = [i for i, g in enumerate(got) if g is None]
        if len(miss) == len(es):
            mixed = self._mix(ids)
            for e, m in zip(es, mixed, strict=True):
                self.cache.put((self.layer, e), m.clone())
            return mixed
        if miss:
            for i, m in zip(miss, self._mix(ids[miss]), strict=True):
                got[i] = own = m.clone()
                self.cache.put((self.layer, es[i]), own)
        return torch.stack(got)  # type: ignore[arg-type]

    def bases(self, ids: torch.Tensor) -> torch.Tensor:
        """[n, 2r, d] for experts ids (prepared for this forward, or mixed now)."""
        if self.ready is not None and self.slot is not None:
            rows = self.slot[ids]
            first = int(rows[0])
            if bool((rows == torch.arange(first, first + len(rows))).all()):  # batches come in prepare's order
                return self.ready[first:first + len(rows)]
            return self.ready[rows.to(self.ready.device)]
        return self._mixed(ids)

    def pre(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        M = self.bases(ids)
        A_g, A_u = (self.w.experts(self.A_name[pr], ids) for pr in PROJS)
        if x.shape[1] >= self.threshold:
            gate, up = self._materialise(A_g, A_u, M)
            return torch.bmm(x, gate.mT), torch.bmm(x, up.mT)
        r = self.r
        z = torch.bmm(x, M.mT)
        return torch.bmm(z[..., :r], A_g.mT), torch.bmm(z[..., r:], A_u.mT)

    def _materialise(self, A_g: torch.Tensor, A_u: torch.Tensor, M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.bmm(A_g, M[:, : self.r]), torch.bmm(A_u, M[:, self.r:])

    def gate_up(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Reconstructed W_e = A_e M_e (tests and tools; the forward chooses per batch, see apply)."""
        A_g, A_u = (self.w.experts(self.A_name[pr], ids) for pr in PROJS)
        return self._materialise(A_g, A_u, self.bases(ids))


class LowRankExperts(OriginalExperts):
    """Baseline checkpoints (`--method svd|delta`): gate/up = [W̄_g(e) +] U_e V_e, applied factored."""

    def __init__(self, w: UnitWeights, p: int, math: ExpertMath, hidden: int):
        super().__init__(w, p, math, hidden)
        self.U = {pr: factor_name(EXPERTS, pr, "lowrank_U") for pr in PROJS}  # read per routed expert
        self.V = {pr: factor_name(EXPERTS, pr, "lowrank_V") for pr in PROJS}
        self.mean = {pr: w.get(factor_name(EXPERTS, pr, "lowrank_mean")) for pr in PROJS}
        E = w.shape(self.U["gate_proj"])[0]
        G = 1 if self.mean["gate_proj"] is None else self.mean["gate_proj"].shape[0]
        self.per_group = E // G

    def _proj(self, pr: str, ids: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        y = torch.bmm(torch.bmm(x, self.w.experts(self.V[pr], ids).mT), self.w.experts(self.U[pr], ids).mT)
        mean = self.mean[pr]
        if mean is not None:
            y = y + torch.bmm(x, mean[(ids // self.per_group).to(mean.device)].mT)
        return y

    def gate_up(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = []
        for pr in PROJS:
            W = torch.bmm(self.w.experts(self.U[pr], ids), self.w.experts(self.V[pr], ids))
            mean = self.mean[pr]
            out.append(W if mean is None else W + mean[(ids // self.per_group).to(mean.device)])
        return out[0], out[1]

    def pre(self, ids: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._proj("gate_proj", ids, x), self._proj("up_proj", ids, x)


__all__ = ["LowRankExperts", "MixedBasisCache", "MobeExperts", "all_bases_bytes", "auto_cache_bytes", "materialize_threshold"]
