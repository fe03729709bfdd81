"""The MoBE parameterisation: W_e ≈ scale · A_e · act(Σ_i softmax(α_e)_i · B_{g(e), i}).

Bases B are shared by the experts of a group (g(e) = e // (E / G)); A_e and α_e are per expert.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..checkpoint.fp8 import DEFAULT_BLOCK, dequantize_batch


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


# identity: MoLAE (one basis per group, no activation) shares MoBE's storage and code
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu, "tanh": torch.tanh, "gelu": F.gelu, "identity": _identity}

# d act(x) · g from (g, x, act(x)): for solvers that write their backward pass by hand (one fused
# kernel each where torch has one, instead of autograd's chain of elementwise ops)
ACTIVATION_GRADS: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "silu": lambda g, x, y: torch.ops.aten.silu_backward(g, x),
    "tanh": lambda g, x, y: g * (1 - y * y),
    "gelu": lambda g, x, y: torch.ops.aten.gelu_backward(g, x),
    "identity": lambda g, x, y: g,
}


@dataclass(frozen=True)
class MoBESpec:
    num_bases: int  # m, over all groups
    rank: int  # r
    activation: str = "silu"
    groups: int = 1

    def __post_init__(self):
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"unknown activation {self.activation!r}; use one of {', '.join(ACTIVATIONS)}")
        if self.num_bases < 1 or self.rank < 1 or self.groups < 1 or self.num_bases % self.groups:
            raise ValueError(f"num_bases ({self.num_bases}) must be a positive multiple of groups ({self.groups}), rank >= 1")

    @property
    def bases_per_group(self) -> int:
        return self.num_bases // self.groups


MIX_CHUNK = 1 << 22  # basis elements converted to fp32 at a time when B is stored in a narrower dtype


def _mix_group(weights: torch.Tensor, Bg: torch.Tensor) -> torch.Tensor:
    """weights [k, m_g] (fp32) @ Bg [m_g, n] in fp32; a narrower Bg is widened a column chunk at a
    time, so mixing a bf16/FP8-sized basis bank never holds an fp32 copy of all of it."""
    if Bg.dtype == weights.dtype:
        return weights @ Bg
    out = torch.empty((weights.shape[0], Bg.shape[1]), dtype=weights.dtype, device=Bg.device)
    for c0 in range(0, Bg.shape[1], MIX_CHUNK):
        out[:, c0:c0 + MIX_CHUNK] = weights @ Bg[:, c0:c0 + MIX_CHUNK].to(weights.dtype)
    return out


def expert_groups(experts: torch.Tensor | range, num_experts: int, groups: int,
                  device: torch.device | str) -> list[tuple[int, torch.Tensor | None]]:
    """(group, positions of the given experts in it on `device`) for every group present; positions
    None when all experts share one group (the usual case: no index juggling). Worked out on the
    host, so a CUDA step never waits on the device."""
    ids = torch.as_tensor(list(experts)) if isinstance(experts, range) else experts.reshape(-1).cpu()
    group = ids // (num_experts // groups)
    present = torch.unique(group).tolist()
    if len(present) == 1:
        return [(present[0], None)]
    return [(g, (group == g).nonzero(as_tuple=True)[0].to(device)) for g in present]


def mix(weights: torch.Tensor, B: torch.Tensor, sels: list[tuple[int, torch.Tensor | None]],
        matmul: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Σ_i weights[e, i] B_{g(e), i} before the activation, [k, r·d] on B's device; `sels` from
    expert_groups; B is [G, m_g, ...] (a column slice [G, m_g, n] too). One matmul per group
    present (`matmul(weights [k', m_g], B_g [m_g, n])`, default fp32 `_mix_group`; the als step
    passes its precision's product); never builds a [k, m, r, d] gather."""
    matmul = _mix_group if matmul is None else matmul
    G, mg = B.shape[:2]
    if len(sels) == 1 and sels[0][1] is None:
        return matmul(weights, B[sels[0][0]].reshape(mg, -1))
    out: torch.Tensor | None = None
    for g, sel in sels:
        y = matmul(weights[sel], B[g].reshape(mg, -1))
        if out is None:
            out = torch.empty((weights.shape[0], y.shape[1]), dtype=y.dtype, device=y.device)
        out[sel] = y
    assert out is not None
    return out


def mixed_bases(alpha: torch.Tensor, B: torch.Tensor, experts: torch.Tensor | range, num_experts: int,
                activation: str) -> torch.Tensor:
    """act(Σ_i softmax(α_e)_i B_{g(e), i}) for the given experts: [k, r, d], math in fp32.

    The one mixing function: the solvers, the init, reconstruction and the runtime all call it.
    `alpha` holds the given experts' logit rows [k, m_g]; `experts` are their ids (a range or a
    tensor on any device).
    """
    G, mg, r, d = B.shape
    weights = torch.softmax(alpha.float(), dim=-1).to(B.device)
    pre = mix(weights, B, expert_groups(experts, num_experts, G, B.device))
    return ACTIVATIONS[activation](pre.view(-1, r, d))


MIX_TILE_BYTES = (2 * 2**20, 256 * 2**20)  # fp32 mix per chunk: (CPU: about its L2 cache, CUDA: bounds temporaries)


def mixed_bases_as(alpha: torch.Tensor, B: torch.Tensor, experts: torch.Tensor | range, num_experts: int,
                   activation: str, dtype: torch.dtype, out: torch.Tensor | None = None,
                   scale: torch.Tensor | None = None, block: tuple[int, int] = DEFAULT_BLOCK) -> torch.Tensor:
    """`mixed_bases` rounded once to `dtype` (the runtime's mixing), a chunk of rows of r at a time:
    the fp32 mix of a chunk takes MIX_TILE_BYTES (on a CPU it stays in cache: mixing is bound by
    memory traffic, not by the m-term sums; 2-4x faster than one pass over a whole [k, r·d] fp32
    temporary when many experts are mixed, tools/bench_forms.py --mixing), and only the groups the
    experts belong to are read. B as stored: compute dtype, or FP8 with its block `scale` [G, m_g, ceil(r/bm), ceil(d/bn)]
    (dequantized a chunk at a time, whole row blocks; never a dequantized copy of the bank).
    Same values as mixed_bases(...).to(dtype); written into `out` [k, r, d] when given (its rows may
    be strided, e.g. one half of a [k, 2r, d] tensor)."""
    G, mg, r, d = B.shape
    weights = torch.softmax(alpha.float(), dim=-1).to(B.device)
    sels = expert_groups(experts, num_experts, G, B.device)
    if out is None:
        out = torch.empty((weights.shape[0], r, d), dtype=dtype, device=B.device)
    bm = block[0]
    chunk = MIX_TILE_BYTES[B.device.type == "cuda"] // (4 * max(1, weights.shape[0]))  # fp32 elements per expert
    rows = max(1, chunk // d) if scale is None else max(1, chunk // (d * bm)) * bm
    for r0 in range(0, r, rows):
        r1 = min(r, r0 + rows)
        for g, sel in sels:
            if scale is None:
                Bg = B[g, :, r0:r1].reshape(mg, -1).float()
            else:
                s = scale[g, :, r0 // bm:(r1 + bm - 1) // bm]
                Bg = dequantize_batch(B[g, :, r0:r1], s, block, torch.float32).reshape(mg, -1)
            w = weights if sel is None else weights[sel]
            y = ACTIVATIONS[activation](w @ Bg).view(-1, r1 - r0, d).to(dtype)
            if sel is None:
                out[:, r0:r1] = y
            else:
                out[sel, r0:r1] = y
    return out


@dataclass
class MoBEFactors:
    A: torch.Tensor  # [E, p, r]
    B: torch.Tensor  # [G, m_g, r, d]
    alpha: torch.Tensor  # [E, m_g] logits
    scale: float = 1.0
    activation: str = "silu"

    @property
    def num_experts(self) -> int:
        return self.A.shape[0]

    def reconstruct(self, experts: torch.Tensor | None = None, activation: str | None = None) -> torch.Tensor:
        """scale · A_e M_e for the given experts (all by default): [k, p, d] in fp32."""
        E = self.num_experts
        idx = torch.arange(E) if experts is None else torch.as_tensor(experts).reshape(-1)
        B = self.B.float()  # the result lives where B does (the caller may move B to a GPU once)
        M = mixed_bases(self.alpha[idx.to(self.alpha.device)].float(), B, idx, E, activation or self.activation)
        return self.scale * torch.bmm(self.A[idx.to(self.A.device)].to(B.device, torch.float32), M)

    def to(self, device) -> MoBEFactors:
        return MoBEFactors(self.A.to(device), self.B.to(device), self.alpha.to(device), self.scale, self.activation)


def prepare_targets(W: torch.Tensor) -> tuple[torch.Tensor, float]:
    """Divide by the std over all experts of the layer (the paper's z-scoring; it helps Adam).

    In place when W is already fp32 (the layer's targets are the largest tensor of the fit).
    """
    W = W if W.dtype == torch.float32 else W.float()
    std = float(W.std())
    if not std > 0:
        std = 1.0
    return W.div_(std), std
