"""Planning for `--device-map experts`: routed experts on the host, everything else on the compute
device, from the shard headers alone.

accelerate places whole decoder layers; in an MoE layer almost all bytes are routed experts of which
a token uses top_k (Kimi-K2: 8 of 384). This plan keeps every non-expert weight (attention, norms,
routers, shared experts, dense layers, embeddings, lm_head; for MoBE the bases B and logits alpha)
resident on the compute device and holds the routed experts (original gate/up/down, FP8 as stored;
MoBE A factors and down_proj) in host RAM, or on disk (the source shards, mmapped) once RAM is
full. Per forward only the routed experts travel, through a byte-bounded LRU of hot experts on the
device (expert_store.py). On the compute device:

    resident = sum over units of non-expert stored bytes        (weights.tensor_stored_bytes)
             + max over units of dequant working room           (weights.unit_working_bytes)
             + staging = top_k x largest expert's stored bytes  (one decode step's misses in flight)
    resident + expert_cache <= max_memory[device]               else ResourceError (exit 2)

Host: each MoE layer's experts go to "cpu" while they fit (on a CPU-only machine after the resident
part and the cache). A layer whose experts no longer fit in RAM is kept whole on the compute device
while its room allows (static residency, no transfer; with a GPU this is what keeps all of Kimi-K2
off the disk at 0=70GiB,cpu=900GiB: 60 layers x 15.75 GiB of experts = 945 GiB > 900 GiB of RAM),
and only then goes to "disk" (with a warning unless max_memory names disk, as in device_map.py).
expert_cache defaults to half the device room left after that (capped at the expert bytes not
resident); the other half is left for activations and the KV cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from ..checkpoint.families import BIAS_SUFFIX, EXPERTS_MODULE, fused_name
from ..checkpoint.mobe_format import PROJECTIONS, factor_name
from ..checkpoint.reader import CheckpointReader
from ..errors import ResourceError, warning
from ..sizes import parse_size
from .config import RuntimeConfig
from .device_map import Device, Warn, default_max_memory, fmt_mem, parse_max_memory
from .weights import tensor_stored_bytes, unit_names, unit_scales, unit_tensors, unit_working_bytes

STRATEGY = "experts"
CACHE_KEY, STAGING_KEY, WORKING_KEY = "expert_cache", "expert_staging", "dequant_working"
DEFAULT_CACHE_SHARE = 0.5  # of the device room left after the resident part
# per-expert slices of these [E, ...] tensors travel; MoBE's B and alpha and lowrank means stay resident
STACKED = tuple([fused_name(EXPERTS_MODULE, "gate_proj"), fused_name(EXPERTS_MODULE, "down_proj"),
                 *(fused_name(EXPERTS_MODULE, pr) + BIAS_SUFFIX for pr in ("gate_proj", "down_proj"))]
                + [factor_name(EXPERTS_MODULE, pr, s) for pr in PROJECTIONS for s in ("mobe_A", "lowrank_U", "lowrank_V")])


def experts_key(layer: int) -> str:
    """Plan entry of a layer's routed experts (next to the unit `layers.N`)."""
    return f"layers.{layer}.experts"


def expert_tensors(rels: Iterable[str]) -> dict[str, int | None]:
    """Relative names of a layer's routed-expert tensors -> the expert a per-expert tensor belongs to,
    or None for a stacked [E, ...] tensor (one slice per expert)."""
    out: dict[str, int | None] = {}
    for rel in rels:
        if rel in STACKED:
            out[rel] = None
        elif rel.startswith(EXPERTS_MODULE):
            head = rel[len(EXPERTS_MODULE):].split(".", 1)[0]
            if head.isdigit():
                out[rel] = int(head)
    return out


@dataclass
class LayerExperts:
    """Header facts about one layer's routed experts."""
    layer: int
    per_expert: dict[str, int]   # rel -> expert
    stacked: list[str]           # rels sliced per expert
    total_bytes: int             # all experts, as held
    max_expert_bytes: int        # the largest single expert


def layer_experts(reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype, layer: int) -> LayerExperts | None:
    tensors = unit_tensors(reader, cfg, f"layers.{layer}")
    ex = expert_tensors(tensors)
    if not ex:
        return None
    scales = unit_scales(reader, {rel: tensors[rel] for rel in ex})
    per: dict[int, int] = {}
    stacked_bytes = 0
    for rel, e in ex.items():
        b = tensor_stored_bytes(reader, cfg, rel, tensors[rel], scales.get(rel), dtype)
        if e is None:
            stacked_bytes += b
        else:
            per[e] = per.get(e, 0) + b
    E = cfg.num_experts
    per_slice = math.ceil(stacked_bytes / E)
    return LayerExperts(layer, {r: e for r, e in ex.items() if e is not None}, [r for r, e in ex.items() if e is None],
                        stacked_bytes + sum(per.values()), per_slice + max(per.values(), default=0))


def plan_experts(reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype, max_memory: str | dict | None,
                 expert_cache: int | str | None = None, warn: Warn | None = None) -> tuple[dict[str, Device], dict[str, int]]:
    """(entry -> device, entry -> bytes): every unit on the compute device at its non-expert bytes,
    `layers.N.experts` on cpu/disk, and the device's dequant_working, expert_staging, expert_cache.
    Experts that fit nowhere else go to disk, with one line to `warn` (default stderr) unless
    max_memory names disk (device_map's rule)."""
    mem = parse_max_memory(max_memory) if max_memory is not None else default_max_memory()
    gpus = sorted(k for k in mem if isinstance(k, int))
    device: Device = gpus[0] if gpus else "cpu"
    if device == "cpu" and "cpu" not in mem:
        raise ResourceError("--device-map experts: max_memory names no GPU and no cpu to compute on", reader.model_dir)
    plan: dict[str, Device] = {}
    sizes: dict[str, int] = {}
    experts: dict[int, LayerExperts] = {}
    working = 0
    for unit in unit_names(cfg):
        tensors = unit_tensors(reader, cfg, unit)
        scales = unit_scales(reader, tensors)
        layer = int(unit.split(".")[1]) if unit.startswith("layers.") else None
        info = layer_experts(reader, cfg, dtype, layer) if layer is not None else None
        skip = set(info.per_expert) | set(info.stacked) if info else set()
        plan[unit] = device
        sizes[unit] = sum(tensor_stored_bytes(reader, cfg, rel, n, scales.get(rel), dtype)
                          for rel, n in tensors.items() if rel not in skip)
        working = max(working, unit_working_bytes(reader, cfg, unit, dtype))
        if info is not None:
            experts[info.layer] = info
    staging = cfg.top_k * max((x.max_expert_bytes for x in experts.values()), default=0)
    plan[WORKING_KEY], sizes[WORKING_KEY] = device, working
    plan[STAGING_KEY], sizes[STAGING_KEY] = device, staging
    resident = sum(sizes.values())
    budget = mem[device]
    total_experts = sum(x.total_bytes for x in experts.values())
    cache = None if expert_cache is None else min(parse_size(expert_cache, "--expert-cache", allow_zero=True),
                                                  total_experts)  # more than every expert is never used
    if resident + (cache or 0) > budget:
        what = f"the non-expert part ({_gib(resident)})" + (f" plus --expert-cache ({_gib(cache)})" if cache else "")
        raise ResourceError(f"--device-map experts: {what} does not fit in max_memory[{device}] = {_gib(budget)}",
                            reader.model_dir)
    room = budget - resident
    if cache is not None:
        room -= cache
    host_room = room if device == "cpu" else mem.get("cpu", 0)
    on_device = 0
    for layer, info in experts.items():
        key = experts_key(layer)
        sizes[key] = info.total_bytes
        if info.total_bytes <= host_room:
            plan[key] = "cpu"
            host_room -= info.total_bytes
        elif device != "cpu" and info.total_bytes <= room:  # RAM is full: keep the layer whole on the GPU
            plan[key] = device
            room -= info.total_bytes
            on_device += info.total_bytes
        else:
            plan[key] = "disk"
    on_disk = [k for k, d in plan.items() if d == "disk"]
    if on_disk and "disk" not in mem:
        (warn or warning)(f"--device-map experts: max_memory {fmt_mem(mem)} cannot hold the routed experts: those of "
                          f"{len(on_disk)} of {len(experts)} MoE layers ({on_disk[0]} on) are read from the checkpoint's "
                          f"shards (slow); name disk in --max-memory to plan for it without this warning")
    if cache is None:  # half of the device room left (on a CPU-only machine: of the RAM left)
        cache = min(total_experts - on_device, int(max(room if device != "cpu" else host_room, 0) * DEFAULT_CACHE_SHARE))
    plan[CACHE_KEY], sizes[CACHE_KEY] = device, cache
    return plan, sizes


def _gib(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"
