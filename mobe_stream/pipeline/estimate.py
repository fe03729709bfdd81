"""How long a compression will take, before it starts: a roofline over the solver's step.

step_seconds = matmul FLOPs / (peak · MATMUL_EFFICIENCY) + elementwise traffic / (memory bandwidth ·
MEMORY_EFFICIENCY) + PCIe bytes / PCIe bandwidth + a fixed per-batch overhead; the FLOPs, bytes and
the batch come from factorize/cost.py (the formulas the solver itself sizes its batch with).
A GPU's rates are its spec sheet's dense peaks (../shared notes) times the efficiencies below,
which are assumptions until a GPU run measures them (tools/bench_solver.py prints the achieved
TFLOP/s to compare). A CPU's rates are measured on the spot (a fraction of a second): a batched
matmul at the fit's own shapes in the chosen precision and an elementwise pass for bandwidth.
The init (grouped SVDs, once per projection) is counted at fp32 rate times SVD_EFFICIENCY.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

import torch

from ..checkpoint import fp8
from ..checkpoint.families import kept_target_dtype
from ..factorize import MoBEFactors, MoBESpec, random_metric
from ..factorize.cost import ADAM_BYTES, DEVICE_FRACTION, metric_bytes, plan_memory, step_flops, step_traffic_bytes

MATMUL_EFFICIENCY = 0.6  # of the dense spec-sheet peak, for large batched GEMMs (assumed)
MEMORY_EFFICIENCY = 0.7  # of the spec-sheet bandwidth, for elementwise passes (assumed)
SVD_EFFICIENCY = 0.05  # of the fp32 peak, for the init's SVDs (LAPACK-style; assumed)
BATCH_OVERHEAD_S = 2e-4  # Python + kernel launches per expert batch on a GPU (~40 ops x 5 us)


@dataclass(frozen=True)
class Hardware:
    name: str
    tflops: dict[str, float]  # dense peak per precision
    memory_bytes: int
    bandwidth: float  # bytes/s
    pcie: float  # bytes/s host<->device, pinned


# spec-sheet dense peaks (no sparsity); the ../shared notes list their sources
GPUS = {
    "h100": Hardware("NVIDIA H100 SXM 80GB", {"fp32": 67, "tf32": 494, "bf16": 989}, 80 * 10**9, 3.35e12, 55e9),
    "h200": Hardware("NVIDIA H200 141GB", {"fp32": 67, "tf32": 494, "bf16": 989}, 141 * 10**9, 4.8e12, 55e9),
    "a100-80g": Hardware("NVIDIA A100 80GB", {"fp32": 19.5, "tf32": 156, "bf16": 312}, 80 * 10**9, 2.0e12, 25e9),
    "l40s": Hardware("NVIDIA L40S 48GB", {"fp32": 92, "tf32": 183, "bf16": 362}, 48 * 10**9, 0.86e12, 25e9),
    "rtx4090": Hardware("NVIDIA RTX 4090 24GB", {"fp32": 83, "tf32": 83, "bf16": 165}, 24 * 10**9, 1.0e12, 25e9),
}
GPU_CHOICES = (*GPUS, "cpu")
_NAME_HINTS = (("H200", "h200"), ("H100", "h100"), ("A100", "a100-80g"), ("L40S", "l40s"), ("4090", "rtx4090"))


def hardware_key(device: str) -> str | None:
    """The GPUS key for a resolved compress device ("cpu", "cuda:0"), from the CUDA device's name;
    None for a GPU not in the table (no estimate rather than a wrong one)."""
    if not device.startswith("cuda"):
        return "cpu"
    name = torch.cuda.get_device_name(torch.device(device))
    return next((key for hint, key in _NAME_HINTS if hint in name), None)


@dataclass(frozen=True)
class Estimate:
    device: str
    basis: str  # where the rates come from
    solver: str
    precision: str
    steps: int
    projections: int
    batch: int
    resident: bool
    flops_per_step: int
    traffic_bytes_per_step: int
    device_bytes: int
    host_bytes: int
    pcie_bytes_per_step: int
    step_seconds: float
    init_seconds: float
    hours: float

    def as_dict(self) -> dict:
        return asdict(self)


def target_bytes(E: int, p: int, d: int, stored_dtype: torch.dtype, block: tuple[int, int]) -> int:
    """A projection's targets as the solver keeps them (FP8 with its scales, bf16, fp16, fp32)."""
    return E * fp8.stored_bytes((p, d), stored_dtype, block)


def source_target_bytes(E: int, p: int, d: int, stored: set[str], block: tuple[int, int]) -> int:
    """target_bytes for experts stored as the safetensors dtypes `stored` (one expected; a mix, or an
    encoding the solver does not keep, is counted as the fp32 it is dequantized to)."""
    kept = kept_target_dtype(next(iter(stored)), scaled=True) if len(stored) == 1 else None
    return target_bytes(E, p, d, kept or torch.float32, block)


def _timed(fn, repeat: int = 3) -> float:
    fn()  # warm up (allocator, threads)
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def measure_cpu(p: int, d: int, r: int, batch: int) -> tuple[float, float]:
    """(fp32 matmul FLOP/s at the fit's A·M shape, elementwise bytes/s) on this CPU."""
    k = max(1, min(batch, 8))
    a, b = torch.randn(k, p, r), torch.randn(k, r, d)
    mm_s = _timed(lambda: torch.bmm(a, b))
    x = torch.randn(max(k * p * d, 2**24))  # beyond the caches
    ew_s = _timed(lambda: x.mul_(1.0000001))
    return 2 * k * p * r * d / mm_s, 2 * 4 * x.numel() / ew_s


def probe_cpu_batch(solver: str, p: int, d: int, spec: MoBESpec, batch: int, precision: str,
                    metric_rank: int | None = None) -> float:
    """Seconds of one expert batch of a real solver step at the fit's shapes, on random factors (and,
    for a calibrated fit, a random input metric of its rank: R·H, the thin products, the split
    residual under bf16 are a large part of its step).

    Why a probe and not only a roofline: on a CPU, steps of small layers are dominated by the fixed
    cost of each op (autograd, dispatch, thread start), which no FLOP or byte count predicts."""
    from .solvers import SOLVERS

    g = torch.Generator().manual_seed(0)
    mg, r = spec.bases_per_group, spec.rank
    one = MoBESpec(mg, r, spec.activation, 1)
    W = torch.randn((batch, p, d), generator=g)
    factors = MoBEFactors(torch.randn((batch, p, r), generator=g) / r**0.5, torch.randn((1, mg, r, d), generator=g) / d**0.5,
                          torch.zeros((batch, mg)), 1.0, spec.activation)
    metric = None if metric_rank is None else random_metric(batch, d, metric_rank)
    s = SOLVERS[solver](W, one, init=factors, expert_batch=batch, precision=precision, metric=metric)
    return _timed(s.step, repeat=2)


def estimate(E: int, p: int, d: int, spec: MoBESpec, *, solver: str, precision: str, steps: int, projections: int,
             targets: int, device: str, budget: int | None = None, expert_batch: int | None = None,
             metric_rank: int | None = None) -> Estimate:
    """`device`: a key of GPUS or "cpu"; `targets`: bytes of one projection's stored targets;
    `metric_rank`: a calibrated fit's metric rank (None: data-free)."""
    flops = step_flops(solver, E, p, d, spec, metric_rank, precision)
    r = spec.rank
    group_rows = (E // spec.num_bases) * p  # rows of one init SVD
    svd_flops = spec.num_bases * 4 * group_rows * d * min(group_rows, d)
    hw = None if device == "cpu" else GPUS[device]
    if hw is not None and budget is None:
        budget = int(hw.memory_bytes * DEVICE_FRACTION)
    plan = plan_memory(solver, E, p, d, spec, targets, "cpu" if hw is None else "cuda", budget, expert_batch,
                       metric_rank, precision)
    traffic = step_traffic_bytes(solver, E, p, d, spec, targets / (E * p * d), metric_rank, precision, plan.batch)
    if hw is None:
        mm_rate, bw = measure_cpu(p, d, r, plan.batch)
        # the probe times a whole step of one batch (matmuls, elementwise, overheads) including an Adam
        # update of its m_g bases; a real step has `batches` batches and one update of all m bases
        probe = probe_cpu_batch(solver, p, d, spec, plan.batch, precision, metric_rank)
        update = ADAM_BYTES * r * d / bw  # the fused Adam update of one basis
        step_s = -(-E // plan.batch) * max(probe - spec.bases_per_group * update, 0.5 * probe) + spec.num_bases * update
        init_s = svd_flops / (mm_rate * SVD_EFFICIENCY * 4)  # a CPU's LAPACK runs closer to its GEMM rate
        basis = (f"measured on this CPU: one {plan.batch}-expert batch of a real step {probe * 1e3:.3g} ms, "
                 f"{mm_rate / 1e9:.3g} GFLOP/s fp32 matmul, {bw / 1e9:.3g} GB/s")
    else:
        step_s = (flops / (hw.tflops[precision] * 1e12 * MATMUL_EFFICIENCY) + traffic / (hw.bandwidth * MEMORY_EFFICIENCY)
                  + plan.pcie_bytes_per_step / hw.pcie + -(-E // plan.batch) * BATCH_OVERHEAD_S)
        init_s = svd_flops / (hw.tflops["fp32"] * 1e12 * SVD_EFFICIENCY)
        basis = (f"{hw.name} spec sheet x {MATMUL_EFFICIENCY:.0%} (matmul) / {MEMORY_EFFICIENCY:.0%} (memory): "
                 f"assumed, not measured")
    hours = projections * (steps * step_s + init_s) / 3600
    return Estimate(device, basis, solver, precision, steps, projections, plan.batch, plan.resident, flops, traffic,
                    plan.device_bytes, plan.host_bytes, plan.pcie_bytes_per_step, step_s, init_s, hours)


DISK_BYTES_PER_S = 2e9  # the calibration forward reads every layer once (NVMe-class; assumed)
COMPUTE_BYTES = 2  # hidden states kept in the compute dtype (bf16)


def calib_estimate(*, E: int, d: int, top_k: int, layers: int, compressed_layers: int, tokens: int, ctx: int,
                   rank: int, active_params: int, attention_width: int, checkpoint_bytes: int, device: str) -> dict:
    """What `compress --calib` adds before the fits (pipeline/calib.py), from headers alone.

    forward: 2 x active parameters x tokens, plus attention's 2 x ctx x width per token and layer;
    the metrics: per expert the Gram of its ~tokens·top_k/E routed rows (+ `rank` prior rows) and its
    eigen-solve (fp64), min(n, d)² · max(n, d) work; rates as for the fit (a GPU's spec sheet, or
    this CPU's measured matmul rate) times MATMUL_EFFICIENCY / SVD_EFFICIENCY."""
    n = tokens * top_k / max(E, 1) + rank
    lo, hi = min(n, d), max(n, d)
    metric_flops = compressed_layers * E * (2 * lo * lo * hi + 10 * lo**3)
    forward_flops = 2 * active_params * tokens + 2 * layers * tokens * ctx * attention_width
    if device == "cpu":
        rate, _ = measure_cpu(256, 256, 256, 8)
        fp32 = fp64 = rate
    else:
        hw = GPUS[device]
        rate, fp32 = hw.tflops["bf16"] * 1e12, hw.tflops["fp32"] * 1e12
        fp64 = fp32  # H100/H200/A100 fp64 tensor cores run at about their fp32 rate
    read_s = checkpoint_bytes / DISK_BYTES_PER_S
    forward_s = forward_flops / (rate * MATMUL_EFFICIENCY)
    metric_s = metric_flops / (fp64 * SVD_EFFICIENCY)
    per_layer = metric_bytes(E, d, rank)
    return {"tokens": tokens, "ctx": ctx, "rank": rank,
            "metric_bytes_per_layer": per_layer, "metric_bytes": per_layer * compressed_layers,
            "host_bytes": 2 * tokens * d * COMPUTE_BYTES,  # hidden states + one layer's captured inputs
            "forward_flops": int(forward_flops), "metric_flops": int(metric_flops),
            "read_bytes": checkpoint_bytes,
            "seconds": read_s + forward_s + metric_s}
