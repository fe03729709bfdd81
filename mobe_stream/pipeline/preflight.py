"""Before work starts: is there disk for the output and RAM for one layer's working set?"""

from __future__ import annotations

import shutil
from typing import Callable

import psutil

from ..errors import ResourceError
from ..factorize import working_set_bytes


def projected_output_bytes(job, units) -> int:
    """Bytes the remaining units will write: copied tensors as stored + MoBE factors in the output dtype."""
    fam, reader = job.family, job.reader
    E, p, d = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
    per_proj = job.plan.params(E, p, d) * 4  # an upper bound: α is fp32, the rest the output dtype
    total = 0
    for u in units:
        if u.kind == "copy":
            total += sum(reader.info(n).nbytes for n in u.tensors)
        else:
            total += per_proj
    return total


def layer_ram_bytes(job) -> int:
    fam, spec = job.family, job.spec
    ws = working_set_bytes(fam.num_experts, fam.moe_intermediate_size, fam.hidden_size, spec.num_bases, spec.rank, spec.groups)
    return int(ws["host"] if isinstance(ws, dict) else ws)


def check(job, units, force: bool, warn: Callable[[str], None]) -> None:
    need_disk = projected_output_bytes(job, units)
    free_disk = shutil.disk_usage(job.out).free
    problems = []
    if need_disk > free_disk:
        problems.append(f"{job.out}: output needs about {need_disk / 1e9:.2f} GB more but only {free_disk / 1e9:.2f} GB is free")
    if any(u.kind == "factorize" for u in units):
        need_ram = layer_ram_bytes(job)
        avail = psutil.virtual_memory().available
        if need_ram > avail:
            problems.append(f"one layer's working set needs about {need_ram / 2**30:.2f} GiB of RAM but only {avail / 2**30:.2f} GiB is available")
    for p in problems:
        if force:
            warn(p + " (continuing: --force)")
        else:
            raise ResourceError(p + "; free space or pass --force")
