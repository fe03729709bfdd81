"""What `compress` stores (docs/FORMAT.md): factor tensors under the format's names, the config's
`mobe` block, and the run's summary. The directory mechanics are outdir.py's.
"""

from __future__ import annotations

import math

import torch

from ..checkpoint import fp8, mobe_format
from ..checkpoint.safetensors_io import atomic_write_bytes, atomic_write_json
from ..checkpoint.writer import write_index_and_manifest
from ..dtypes import dtype_key
from ..errors import ConfigError
from ..factorize import LowRankFactors, MethodPlan, MoBEFactors, factors_from_tensors
from . import outdir
from .job import CompressJob, OutputSpec
from .journal import Journal
from .model_card import model_card
from .plan import Unit


def roundtrip_for(output: OutputSpec):
    """How a tensor reads back after storage in `output`'s dtype (fp32), for refit_for_storage."""
    if output.is_fp8:
        return lambda t: fp8.roundtrip(t, output.block)
    return lambda t: t.to(output.dtype).float()


def factor_tensors(experts_prefix: str, proj: str, factors: MoBEFactors | LowRankFactors, std: float,
                   output: OutputSpec) -> dict[str, torch.Tensor]:
    """The stored tensors of one projection; the target std is folded into A (or U and the mean).

    α (mixing logits) stays fp32 whatever the dtype: it is tiny and softmax is sensitive to it.
    FP8: each matrix of a stack gets its own 128x128 block scales under `<name>_scale_inv`.
    """
    name = lambda suffix: mobe_format.factor_name(experts_prefix, proj, suffix)  # noqa: E731
    scale = float(std) * float(getattr(factors, "scale", 1.0))
    if isinstance(factors, LowRankFactors):
        parts = {"lowrank_U": factors.U.float() * scale, "lowrank_V": factors.V.float()}
        if factors.mean is not None:
            parts["lowrank_mean"] = factors.mean.float() * scale
    else:
        parts = {"mobe_A": factors.A.float() * scale, "mobe_B": factors.B.float()}
    out: dict[str, torch.Tensor] = {}
    for suffix, t in parts.items():
        if output.is_fp8:
            q, s = fp8.quantize_stack(t, output.block)
            out[name(suffix)], out[fp8.scale_name(name(suffix))] = q, s
        else:
            out[name(suffix)] = t.to(output.dtype).contiguous()
    if isinstance(factors, MoBEFactors):
        out[name(mobe_format.ALPHA)] = factors.alpha.float().contiguous()
    return out


def stored_factors(plan: MethodPlan, experts_prefix: str, proj: str, tensors: dict[str, torch.Tensor],
                   output: OutputSpec, std: float) -> MoBEFactors | LowRankFactors:
    """The factors exactly as a reader will see them (dequantized), on the z-scored targets' scale:
    the reconstruction error reported is the stored model's, not the fit's."""
    values = {}
    for suffix, n in mobe_format.factor_names(experts_prefix, proj, plan.shapes(1, 1, 1)).items():
        t = tensors.get(n)
        if t is None:
            continue
        sn = fp8.scale_name(n)
        values[suffix] = fp8.dequantize_stack(t, tensors[sn], output.block, torch.float32) if sn in tensors else t.float()
    f = factors_from_tensors(plan, values)
    f.scale = 1.0 / float(std)
    return f



def mobe_block(job: CompressJob, journal: Journal) -> dict:
    errors: dict[str, dict[str, float]] = {}  # in plan order, whatever order the units finished in
    for layer in job.layers:
        for proj in mobe_format.PROJECTIONS:
            u = journal.units.get(f"layer.{layer}.{proj}")
            if u is not None and u["info"].get("kind") == "factorize":
                errors.setdefault(str(layer), {})[proj] = u["info"]["rel_error"]
    mobe = job.plan.method == "mobe"
    return {
        "format_version": mobe_format.FORMAT_VERSION,
        **job.plan.config(),
        "solver": job.fit.solver if mobe else None,
        "init": job.fit.init if mobe else None,
        "seed": job.fit.seed if mobe else None,
        "projections": list(mobe_format.PROJECTIONS),
        "layers": job.layers,
        "layout": job.family.layout,
        "dtype": dtype_key(job.output.dtype),
        "fp8_block": list(job.output.block) if job.output.is_fp8 else None,
        "errors": errors,
        "source_family": job.family.name,
        "steps": job.fit.steps,
    }


def summarize(job: CompressJob, journal: Journal) -> dict:
    fam = job.family
    E, p, d = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
    before_layer = 3 * E * p * d
    after_layer = E * p * d + 2 * job.plan.params(E, p, d)
    rows = []
    for layer in job.layers:
        units = {proj: journal.units.get(f"layer.{layer}.{proj}", {}).get("info", {}) for proj in mobe_format.PROJECTIONS}
        copy = journal.units.get(f"layer.{layer}.copy", {}).get("info", {})
        rows.append({
            "layer": layer,
            **{proj: units[proj].get("rel_error") for proj in mobe_format.PROJECTIONS},
            "seconds": sum(u.get("seconds", 0.0) for u in (*units.values(), copy)),
            "params_before": before_layer,
            "params_after": after_layer,
        })
    total_before = sum(math.prod(job.reader.info(n).shape) for n in job.reader.names()
                       if not n.endswith(("_scale_inv", "rotary_emb.inv_freq")))
    saved = (before_layer - after_layer) * len(job.layers)
    n_moe = len(fam.moe_layers())
    return {
        "source": str(job.src),
        "output": str(job.out),
        "method": job.plan.method,
        "num_bases": job.plan.num_bases,
        "rank": job.plan.rank,
        "layers": rows,
        "expert_params_before": before_layer * n_moe,
        "expert_params_after": before_layer * n_moe - saved,
        "expert_reduction": saved / max(1, before_layer * n_moe),
        "total_params_before": total_before,
        "total_params_after": total_before - saved,
        "total_reduction": saved / max(1, total_before),
        "seconds": sum(u["info"].get("seconds", 0.0) for u in journal.units.values()),
    }


def finalize(job: CompressJob, journal: Journal, units: list[Unit]) -> dict:
    """Index + manifest (from the journal's shard records), config with the `mobe` block, side files.

    Idempotent: a resumed run that finds everything done just rewrites these small files.
    """
    records = [rec for u in units for rec in journal.units[u.key]["shards"]]
    for rec in records:  # cheap verification of our own output (the full sha256 check is `verify`)
        path = job.out / rec["filename"]
        if not path.is_file() or path.stat().st_size != rec["size"]:
            raise ConfigError(f"{path}: shard missing or of the wrong size after writing; rerun with --resume")
    write_index_and_manifest(job.out, records, {"mobe_format_version": str(mobe_format.FORMAT_VERSION)})
    mobe = mobe_block(job, journal)
    atomic_write_json(job.out / "config.json", mobe_format.compact_config(job.reader.config, mobe, job.family.name))
    outdir.copy_side_files(job.src, job.out)
    summary = summarize(job, journal)
    outdir.write_modeling_file(job.out)
    atomic_write_bytes(job.out / mobe_format.CARD_NAME, model_card(job.src, mobe, summary).encode())
    return summary
