"""accelerate-style device map: which device holds each unit (embed, layers.N, norm, lm_head).

Greedy in module order; a decoder layer is never split; on every device that has a later device to
offload to, room for the largest unit stays free so an offloaded unit can be brought in to run.
GPUs (ints) first, then "cpu", then "disk" (always the last resort in "auto"/"balanced").
"""

from __future__ import annotations

import math

from ..errors import ConfigError, ResourceError
from ..sizes import parse_size

Device = int | str


def _device_key(k: str) -> Device:
    k = k.strip().lower()
    if k in ("cpu", "disk"):
        return k
    k = k.removeprefix("cuda:")
    if k.isdigit():
        return int(k)
    raise ConfigError(f"unknown device {k!r} in max_memory (use GPU indices, cpu, disk)")


def parse_max_memory(spec: str | dict | None) -> dict[Device, float]:
    """"0=20GiB,cpu=64GiB,disk" -> {0: 21474836480, "cpu": ..., "disk": inf}."""
    if spec is None:
        return {}
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            k, _, v = part.partition("=")
            items.append((k, v or None))
    out: dict[Device, float] = {}
    for k, v in items:
        out[_device_key(k)] = (math.inf if v is None or v == "" or v == math.inf
                               else parse_size(v, f"max_memory[{k}]", allow_zero=True))
    return out


def default_max_memory() -> dict[Device, float]:
    """Free memory of each GPU (90% when there is exactly one) and psutil's available RAM."""
    import psutil
    import torch

    mem: dict[Device, float] = {}
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i in range(n):
            free, _ = torch.cuda.mem_get_info(i)
            mem[i] = int(free * 0.9) if n == 1 else free
    mem["cpu"] = psutil.virtual_memory().available
    return mem


def check_gpus(devices, what: str) -> None:
    """Refuse GPU indices this machine does not have, before anything is placed on them (planning
    alone, e.g. --dry-run for a bigger machine, never calls this)."""
    import torch

    gpus = sorted({d for d in devices if isinstance(d, int)})
    if not gpus:
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ConfigError(f"{what} names GPU {gpus[0]} but no CUDA device is available "
                          f"(plan for another machine with --dry-run --print-device-map)")
    if gpus[-1] >= n:
        raise ConfigError(f"{what} names GPU {gpus[-1]} but only {n} GPUs are available (indices 0-{n - 1})")


def _order(mem: dict[Device, float]) -> list[Device]:
    gpus = sorted(k for k in mem if isinstance(k, int))
    return gpus + [k for k in ("cpu", "disk") if k in mem]


def plan_device_map(layer_sizes: dict[str, int], max_memory: str | dict | None = None,
                    strategy: str = "auto") -> dict[str, Device]:
    """unit -> device. max_memory: accelerate string/dict; None = defaults (free GPU memory, RAM).

    "auto": balanced over several GPUs, else sequential; "balanced": spread over GPUs evenly;
    "sequential": fill each GPU before the next; "cpu": everything on the CPU.
    """
    if strategy not in ("auto", "balanced", "sequential", "cpu"):
        raise ConfigError(f"unknown device map strategy {strategy!r} (auto, balanced, sequential, cpu, experts)")
    mem = parse_max_memory(max_memory) if max_memory is not None else default_max_memory()
    if strategy == "cpu":
        return {u: "cpu" for u in layer_sizes}
    if max_memory is None:
        mem["disk"] = math.inf  # defaults may spill to disk; a user-given max_memory must name "disk"
    devices = _order(mem)
    gpus = [d for d in devices if isinstance(d, int)]
    largest = max(layer_sizes.values(), default=0)
    budget = dict(mem)
    if strategy in ("auto", "balanced") and len(gpus) > 1:
        share = math.ceil(sum(layer_sizes.values()) / len(gpus)) + largest
        for g in gpus[:-1]:
            budget[g] = min(budget[g], share)
    plan: dict[str, Device] = {}
    used = {d: 0 for d in devices}
    di = 0
    for unit, size in layer_sizes.items():
        while di < len(devices):
            d = devices[di]
            reserve = largest if di < len(devices) - 1 and d != "disk" else 0
            if used[d] + size <= budget[d] - reserve:
                break
            di += 1
        if di == len(devices):
            raise ResourceError(f"{unit} ({size} bytes) does not fit: max_memory "
                                f"{ {k: v for k, v in mem.items()} } is too small (add disk offload, e.g. ',disk')")
        plan[unit] = devices[di]
        used[devices[di]] += size
    return plan


def format_plan(plan: dict[str, Device], layer_sizes: dict[str, int]) -> str:
    """One line per unit (unit -> device, bytes) plus per-device totals."""
    w = max((len(u) for u in plan), default=12)
    lines = [f"{u:<{w}} -> {str(d):<5} {layer_sizes[u]:>14,d} B" for u, d in plan.items()]
    totals: dict[str, int] = {}
    for u, d in plan.items():
        totals[str(d)] = totals.get(str(d), 0) + layer_sizes[u]
    lines.append("total: " + ", ".join(f"{d}={b / 2**20:.1f} MiB" for d, b in totals.items()))
    return "\n".join(lines)
