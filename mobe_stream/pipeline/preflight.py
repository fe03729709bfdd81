"""Before work starts: is there disk for the output and RAM for one layer's working set?"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

import psutil
import torch

from ..checkpoint.families import Family
from ..checkpoint.mobe_format import projection_bytes
from ..checkpoint.reader import CheckpointReader
from ..errors import ResourceError
from ..factorize import MethodPlan, working_set_bytes
from ..factorize.cost import device_budget
from .estimate import Estimate, estimate, hardware_key, source_target_bytes
from .job import CompressJob, source_expert_dtypes
from .plan import Unit


def projected_output_bytes(reader: CheckpointReader, family: Family, plan: MethodPlan, units: list[Unit],
                           dtype: torch.dtype, block: tuple[int, int], extra_bytes: int = 0) -> int:
    """Bytes the remaining units will write: copied tensors as stored + factors as stored in `dtype`
    (FP8 with its block scales) + `extra_bytes` (side files copied at the end)."""
    E, p, d = family.num_experts, family.moe_intermediate_size, family.hidden_size
    per_proj = projection_bytes(plan.shapes(E, p, d), dtype, block)
    total = extra_bytes
    for u in units:
        if u.kind == "copy":
            total += sum(reader.info(n).nbytes for n in u.tensors)
        else:
            total += per_proj
    return total


def layer_ram_bytes(job: CompressJob) -> int:
    """Host RAM of one projection's fit: its targets as stored plus what the solver keeps on the host."""
    fam, spec = job.family, job.spec
    ws = working_set_bytes(fam.num_experts, fam.moe_intermediate_size, fam.hidden_size, spec.num_bases, spec.rank,
                           spec.groups, device="cpu" if job.fit.device == "cpu" else "cuda", solver=job.fit.solver,
                           target_bytes=_target_bytes(job), budget=job.fit.max_device_bytes, precision=job.fit.precision)
    return int(ws["host"])


def _target_bytes(job: CompressJob) -> int:
    fam = job.family
    return source_target_bytes(fam.num_experts, fam.moe_intermediate_size, fam.hidden_size,
                               source_expert_dtypes(job.reader, fam, job.layers), job.reader.scale_block)


def check(out: Path, need_disk: int, need_ram: int | None, force: bool, warn: Callable[[str], None],
          remedy: str = "free space or pass --force") -> None:
    """Refuse (or with `force` warn) when `need_disk` bytes will not fit in `out` or `need_ram`
    (None: nothing to fit) exceeds the RAM available now. `remedy` ends the refusal (a command
    without --force must not suggest it)."""
    free_disk = shutil.disk_usage(out).free
    problems = []
    if need_disk > free_disk:
        problems.append(f"{out}: output needs about {need_disk / 1e9:.2f} GB more but only {free_disk / 1e9:.2f} GB is free")
    if need_ram is not None:
        avail = psutil.virtual_memory().available
        if need_ram > avail:
            problems.append(f"one layer's working set needs about {need_ram / 2**30:.2f} GiB of RAM but only "
                            f"{avail / 2**30:.2f} GiB is available")
    for p in problems:
        if force:
            warn(p + " (continuing: --force)")
        else:
            raise ResourceError(f"{p}; {remedy}")


def estimate_for(job: CompressJob, projections: int) -> Estimate | None:
    """The projected time of the `projections` fits still to do, on the run's own device (None for a
    GPU the estimate has no rates for)."""
    key = hardware_key(job.fit.device)
    if key is None:
        return None
    fam, spec = job.family, job.spec
    E, p, d = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
    return estimate(E, p, d, spec, solver=job.fit.solver, precision=job.fit.precision, steps=job.fit.steps,
                    projections=projections, targets=_target_bytes(job), device=key,
                    budget=device_budget(job.fit.device, job.fit.max_device_bytes))
