"""What one solver step costs: device memory, host memory, PCIe traffic, FLOPs and memory traffic.

The one owner of these formulas: the solvers size their expert batch with `plan_memory`, inspect
and the compress preflight print `plan_memory` + `step_flops` + `step_traffic_bytes` through the
estimate (pipeline/estimate.py). All bytes are exact counts of the tensors the code allocates,
rounded up where autograd's temporaries are not fully predictable (the batch term).

Kimi-K2, one gate or up projection (E=384, p=2048, d=7168, m=128 as 2 groups of 64, r=p), with
FP8 targets and the variable-projection solver (als), resident on one device:
  targets 5.64 GB (FP8) + 0.0014 GB scales; bases B 7.52 GB fp32, held 5 times (value, two Adam
  moments, best iterate, gradient) = 37.6 GB; α and its state 0.5 MB. Under bf16 (the GPU
  default) the step holds its intermediates in bf16 and B once more as a bf16 operand (3.8 GB):
  ~0.23 GB of temporaries per expert in a batch -> an 80 GB card (72 GB usable at 90%) runs
  batches of ~108 experts (fp32/tf32: 0.44 GB per expert, batches of ~65), nothing crossing PCIe
  per step. Adam additionally holds A (E·p·r fp32 = 6.4 GB) with two moments, best and candidate
  (32 GB): it cannot be resident and moves A and both moments in and out (38.7 GB) plus the
  targets every step.
FLOPs per step (als): 2Er²d (Gram) + 2Eprd (MWᵀ) + Er³/3 + 2Er²p (Cholesky solves) + 4Eprd
(A·M and Aᵀ·dR) + 6E·m_g·r·d (mixing, both passes) = 102 TFLOP; Adam: 6Eprd + 6E·m_g·r·d = 71 TFLOP.
Memory traffic per step (als, step_traffic_bytes, counted pass by pass): 287 GB under bf16 (73 GB
over the targets, 68 GB over the mixed bases, 146 GB over the bases: their per-batch reads, the
fused Adam update, the best iterate); 479 GB under fp32/tf32. Before the bf16 intermediates and the
fused Adam (commit 36cd44c) the same count gives 885 GB under bf16: every product cast its fp32
operands (M four times a batch), and Adam made ~22 passes over B.

A calibrated fit (`metric_rank` k, factorize/metric.py) keeps the input metric on the device
(E·d·(k+1) fp32: 1.4 GB at k = 128) and adds per expert the weighted residual R·H (p·d) and thin
products with V: 6pdk + 4rdk + 2r²k + 2rpk FLOPs (Kimi-K2 at k = 128: +8.4 TFLOP, +8%), and the
diagonal scalings' memory traffic, in the work dtype like the rest of the step. Under bf16 its
residual carries A as two bf16 parts ([hi | lo]·[M; M], Precision.residual_split_: +2Eprd, +23
TFLOP, and a copy of M): 133 TFLOP and 468 GB per step against 102 TFLOP and 287 GB (batches of 58
experts), 0.426 s against 0.296 s on an H100 by the estimate.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .model import MoBESpec

F32 = 4
SHARED_COPIES = 5  # B: value, Adam m and v, best iterate, gradient (autograd accumulates into it)
CPU_BATCH_BYTES = 256 * 2**20  # CPU temporaries per batch: fixed, so results never depend on free RAM
DEVICE_FRACTION = 0.9  # of free device memory, when no budget is given (accelerate's default too)


def device_budget(device: torch.device | str, max_device_bytes: int | None) -> int | None:
    """A fit's byte budget on `device`: the cap given, else DEVICE_FRACTION of a CUDA device's free
    memory; None on a CPU without a cap."""
    device = torch.device(device)
    if max_device_bytes is not None or device.type != "cuda":
        return max_device_bytes
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * DEVICE_FRACTION)


def per_expert_state_bytes(kind: str, p: int, r: int, spec: MoBESpec) -> int:
    """Per-expert parameters with their Adam moments, best and candidate copies (fp32)."""
    n = spec.bases_per_group + (p * r if kind == "adam" else 0)
    return 5 * F32 * n


def work_bytes(kind: str, precision: str) -> int:
    """Bytes of an element of the step's large intermediates (Precision.work_dtype): 2 for the
    hand-written als step under bf16, else 4."""
    return 2 if kind == "als" and precision == "bf16" else F32


def shared_state_bytes(spec: MoBESpec, d: int, kind: str = "als", precision: str = "fp32") -> int:
    """B and its state (SHARED_COPIES fp32 copies), plus the als step's bf16 operand copy of B."""
    wb = work_bytes(kind, precision)  # a narrower step also holds B in that width
    operand = wb * spec.num_bases * spec.rank * d if wb != F32 else 0
    return SHARED_COPIES * F32 * spec.num_bases * spec.rank * d + operand


def metric_bytes(E: int, d: int, metric_rank: int | None) -> int:
    """The calibrated fit's input metric (diagonal + rank-k factor, fp32); 0 for a data-free fit."""
    return 0 if metric_rank is None else F32 * E * d * (metric_rank + 1)


def batch_bytes_per_expert(kind: str, p: int, d: int, r: int, metric_rank: int | None = None,
                           precision: str = "fp32") -> int:
    """Device temporaries one expert adds to a batch. als (backward by hand): the targets' batch (the
    residual overwrites it), the mixed basis before and after the activation, dM and the
    activation's gradient, all in the work dtype (work_bytes); under fp32 also A·M (under bf16 the
    residual is formed in the GEMM's epilogue); the least-squares system (G, its factor, MWᵀ, A)
    fp32. adam (autograd, fp32): targets, residual and its gradient, the mixed basis, its input
    and their gradients, A with its gradient. A calibrated fit adds the weighted residual R·H, M
    scaled by the metric's diagonal and the thin products with its factor; under bf16 its residual
    also holds [M; M] and A's two parts (residual_split_)."""
    wb = work_bytes(kind, precision)
    extra = 0 if metric_rank is None else wb * (p * d + r * d) + F32 * 2 * (p + r) * metric_rank
    if split_residual(kind, metric_rank, precision):
        extra += 2 * wb * r * d + 6 * wb * p * r  # [M; M]; [hi | lo] with its two halves made
    if kind == "als":
        targets = p * d * (2 * F32 if wb == F32 else wb)
        return targets + 4 * wb * r * d + F32 * (3 * p * r + 2 * r * r) + extra
    return F32 * (3 * p * d + 5 * r * d + 4 * p * r) + extra


@dataclass(frozen=True)
class MemoryPlan:
    resident: bool  # targets and per-expert state live on the compute device for the whole fit
    batch: int  # experts per batch
    device_bytes: int  # peak device bytes of a step
    host_bytes: int  # peak host bytes of the fit (targets as stored + state kept on the host)
    pcie_bytes_per_step: int  # host<->device bytes per step (0 when resident or on the CPU)


def plan_memory(kind: str, E: int, p: int, d: int, spec: MoBESpec, target_bytes: int, device_type: str,
                budget: int | None = None, expert_batch: int | None = None,
                metric_rank: int | None = None, precision: str = "fp32") -> MemoryPlan:
    """Where the fit's tensors live and how many experts a batch takes.

    `target_bytes`: the targets as stored (FP8 + scales, bf16, or fp32). On the CPU everything is
    "resident" and the batch is sized from a fixed CPU_BATCH_BYTES (or from `budget`). On a device with `budget` bytes:
    resident when targets + all state + one expert's temporaries fit, the batch filling the rest;
    otherwise targets and per-expert state stay on the host (pinned) and stream through the device
    in double-buffered batches, each step moving the targets in and the per-expert state in and out.
    A calibrated fit's metric (`metric_rank`) stays on the device in both cases.
    """
    r = spec.rank
    per_batch = batch_bytes_per_expert(kind, p, d, r, metric_rank, precision)
    shared = shared_state_bytes(spec, d, kind, precision) + metric_bytes(E, d, metric_rank)
    per_state = per_expert_state_bytes(kind, p, r, spec)
    state = shared + E * per_state
    if device_type == "cpu":  # a budget here caps the batch temporaries only (host RAM is checked elsewhere)
        room = CPU_BATCH_BYTES if budget is None else budget - shared
        batch = min(E, expert_batch or max(1, room // per_batch))
        host = target_bytes + state + batch * per_batch
        return MemoryPlan(True, batch, 0, host, 0)
    assert budget is not None, "a device plan needs a byte budget"
    resident_base = target_bytes + state
    if resident_base + per_batch <= budget:
        batch = min(E, expert_batch or max(1, (budget - resident_base) // per_batch))
        return MemoryPlan(True, batch, resident_base + batch * per_batch, 0, 0)
    moved = per_state * 3 // 5  # params and both moments travel; best and candidate stay on the host
    in_flight = 2 * (target_bytes // E + moved)  # a batch being computed and the next one arriving
    batch = min(E, expert_batch or max(1, (budget - shared) // (per_batch + in_flight)))
    pcie = target_bytes + 2 * E * moved  # targets in; per-expert state in and back out
    return MemoryPlan(False, batch, shared + batch * (per_batch + in_flight), target_bytes + E * per_state, pcie)


def split_residual(kind: str, metric_rank: int | None, precision: str) -> bool:
    """Whether the step's residual carries A as two bf16 parts (Precision.residual_split_): a
    calibrated als fit under bf16."""
    return kind == "als" and metric_rank is not None and precision == "bf16"


def step_flops(kind: str, E: int, p: int, d: int, spec: MoBESpec, metric_rank: int | None = None,
               precision: str = "fp32") -> int:
    """Matmul FLOPs of one step (one pass over all experts, forward and backward)."""
    r, mg = spec.rank, spec.bases_per_group
    mixing = 6 * E * mg * r * d
    k = metric_rank or 0
    if kind == "als":
        calib = E * (6 * p * d * k + 4 * r * d * k + 2 * r * r * k + 2 * r * p * k)
        if split_residual(kind, metric_rank, precision):
            calib += 2 * E * p * r * d  # the residual's inner dimension doubled (A's low part)
        return 2 * E * r * r * d + 2 * E * p * r * d + E * r**3 // 3 + 2 * E * r * r * p + 4 * E * p * r * d + mixing \
            + calib
    return 6 * E * p * r * d + mixing + E * 6 * p * d * k  # R·V forward, two thin products backward


ADAM_BYTES = 7 * F32  # torch's fused Adam: reads value, gradient and both moments, writes value and moments


def _making_bytes(stored: float, wb: int) -> float:
    """Per target element: the batch made from the stored copy (solver_base._targets, targets.py)."""
    if stored < 2:  # FP8: codes read (1) and widened to bf16 (2), read (2) and scaled into the work dtype
        return 5 + wb
    if stored == wb:  # bf16 stored, bf16 work: one scaling pass
        return 2 * stored
    return stored + F32 + 2 * F32 + (F32 + wb if wb != F32 else 0)  # widened, scaled in place, rounded


def step_traffic_bytes(kind: str, E: int, p: int, d: int, spec: MoBESpec, target_elem_bytes: float,
                       metric_rank: int | None = None, precision: str = "fp32", batch: int | None = None) -> int:
    """Memory traffic of one step outside the big GEMMs' own operand reads, read + write, counted
    pass by pass over what the code allocates: the part of a step bound by memory bandwidth.

    als (als.py), with wb = work_bytes (2 under bf16, else 4) and ob the products' operand bytes:
    - per target element: making the batch (_making_bytes); the residual (fp32: A·M written, then
      W - A·M in place: 16; bf16: the GEMM epilogue reads W and writes R: 2 wb); the loss reads R.
    - per mixed-basis element: the mixing's output, the activation (read, write), dM written, the
      fused activation gradient (reads dM and its input, writes): 6 wb.
    - the bases, per batch and group present: the mixing and gw read the group's operand copy
      (2 ob), B's gradient is accumulated in fp32 (8); per step: the bf16 operand copy (4 + 2),
      the gradient's zero fill (4), the relative steps' norm (4), the fused Adam update
      (ADAM_BYTES), the best iterate (torch.where: 12).
    - a calibrated fit: R·H, its weighted loss and M·diag, in the work dtype too; under bf16 the
      residual's [M; M] copy (M read, twice its size written: 3 wb per mixed element).
    adam (autograd, fp32 intermediates): targets made as fp32, residual, its square and gradient,
    the mixed basis and its chain (~twice als's passes), fused Adam on A; under bf16 every product
    casts its fp32 operands (A, M, and the residual's gradient: 6 bytes an element each).
    """
    r, m, G = spec.rank, spec.num_bases, spec.groups
    bases = m * r * d
    batch = E if batch is None else max(1, batch)
    ob = 2 if precision == "bf16" else F32
    wb = work_bytes(kind, precision)
    # a calibrated fit: R·H formed (R·diag, then R·V·Vᵀ added in place: 4 wb), the weighted loss
    # (fp32: a dot of R and R·H, one read more than the plain loss; bf16: their product summed in
    # fp32, 3 wb more), M·diag (2 wb per mixed element)
    calib = 0 if metric_rank is None else E * (p * d * (4 * wb + (wb if wb == F32 else 3 * wb)) + r * d * 2 * wb)
    if split_residual(kind, metric_rank, precision):
        calib += E * r * d * 3 * wb
    per_step_bases = bases * (4 + 4 + ADAM_BYTES + 12)
    if kind == "als":
        per_target = _making_bytes(target_elem_bytes, wb) + (4 * F32 if wb == F32 else 2 * wb) + wb
        per_mixed = 6 * wb
        passes = -(-E // (G * batch))  # batches per group (a batch within one group: the usual case)
        per_batch_bases = passes * bases * (2 * ob + 2 * F32)
        operand_copy = bases * (F32 + ob) if ob != F32 else 0
        return int(E * p * d * per_target + E * r * d * per_mixed + per_batch_bases + operand_copy + per_step_bases
                   + calib)
    targets = E * p * d * _making_bytes(target_elem_bytes, F32)
    residual = 6 * F32 * E * p * d  # R = W - AM, its square, its gradient
    mixed = 10 * F32 * E * r * d  # mixing output, activation in/out, their gradients
    per_expert = ADAM_BYTES * E * p * r  # Adam on A
    casts = 6 * E * (p * r + r * d + p * d) if precision == "bf16" else 0
    return int(targets + residual + mixed + per_expert + casts + per_step_bases + calib)
