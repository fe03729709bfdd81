"""`inspect`: what a checkpoint holds and what compressing it will cost, from headers alone."""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

from . import defaults
from .checkpoint import fp8
from .checkpoint.families import PROJS as EXPERT_PROJS
from .checkpoint.families import get_family
from .checkpoint.mobe_format import EXPORT_KEY, PROJECTIONS, is_factor, projection_bytes
from .checkpoint.reader import CheckpointReader
from .checkpoint.safetensors_io import ST_TO_TORCH
from .dtypes import dtype_key
from .factorize import MoBESpec, choose_bases_rank, plan_method, working_set_bytes
from .pipeline.estimate import GPU_CHOICES, calib_estimate, estimate, source_target_bytes
from .pipeline.options import CompressOptions, resolve_dtype, resolve_precision
from .runtime.config import parse_config
from .sizes import parse_size


def describe(model_dir: str | Path, num_bases: int | None = None, rank: int | None = None,
             reduction: float | None = None, groups: int = 1, dtype: str = "auto", method: str = "mobe",
             estimate_on: str | None = None, solver: str = defaults.SOLVER, precision: str = defaults.PRECISION,
             steps: int = defaults.STEPS, max_gpu_memory: str | None = None, calib_tokens: int | None = None,
             calib_rank: int = defaults.CALIB_RANK, calib_ctx: int = defaults.CALIB_CTX) -> dict:
    """dtype: output dtype of the factors (auto = the experts' stored dtype, so FP8 stays FP8).
    estimate_on: a GPU of pipeline.estimate.GPUS or "cpu": add the projected time of compress;
    calib_tokens: estimate a calibrated run (`compress --calib`) with this many tokens."""
    # the same option checks as compress (one place): a bad value is exit 2 before any header is read
    CompressOptions(method=method, num_bases=num_bases, rank=rank, reduction=reduction, groups=groups,
                    dtype=dtype, solver=solver, precision=precision, steps=steps,
                    max_gpu_memory=max_gpu_memory).validate()
    if estimate_on is not None and estimate_on not in GPU_CHOICES:
        raise ValueError(f"unknown --gpu {estimate_on!r}; choose one of: {', '.join(GPU_CHOICES)}")
    with CheckpointReader(model_dir) as reader:
        fam = get_family(reader.config, reader)
        E, p, d = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
        moe = fam.moe_layers()
        # gate/up: what MoBE replaces (in the fused layout both name gate_up_proj: a set counts it once)
        gate_up = {n for layer in moe for proj in PROJECTIONS for n in fam.expert_tensor_names(layer, proj)}
        kept = [proj for proj in EXPERT_PROJS if proj not in PROJECTIONS]  # down_proj
        expert_names = gate_up | {n for layer in moe for proj in kept for n in fam.expert_tensor_names(layer, proj)}
        dtypes: Counter = Counter()
        total = expert = size = stored_gate_up = 0
        gate_up_dtypes: set[str] = set()
        for name in reader.names():
            info = reader.info(name)
            size += info.nbytes
            if name in gate_up:
                stored_gate_up += info.nbytes
            if name.endswith(("_scale_inv", "rotary_emb.inv_freq")):
                continue
            n = math.prod(info.shape)
            dtypes[dtype_key(ST_TO_TORCH.get(info.dtype, info.dtype))] += n
            total += n
            if name in expert_names:
                expert += n
                if name in gate_up:
                    gate_up_dtypes.add(info.dtype)
        out = {
            "path": str(Path(model_dir)),
            "family": fam.name,
            "layout": fam.layout,
            "num_layers": fam.num_layers,
            "moe_layers": moe,
            "dense_layers": [i for i in range(fam.num_layers) if i not in set(moe)],
            "experts_per_layer": E,
            "hidden_size": d,
            "moe_intermediate_size": p,
            "dtypes": dict(dtypes),
            "fp8_block": list(reader.fp8_block) if reader.fp8_block else None,
            "total_params": total,
            "expert_params": expert,
            "size_bytes": size,
        }
        compact = "mobe" in reader.config
        own = reader.config.get("mobe") if compact else reader.config.get(EXPORT_KEY)
        if own is not None:  # one of our outputs: describe what it is, not what compressing it would do
            before = after = expert  # exported: the experts are full size again
            if compact:  # gate/up live on as factors
                before += 2 * E * p * d * len(own.get("layers", []))
                after += sum(math.prod(reader.info(n).shape) for n in reader.names()
                             if is_factor(n) and not n.endswith("_scale_inv"))
            errors = [e for per in (own.get("errors") or {}).values() for e in per.values()]
            out["mobe"] = {
                "form": "compact" if compact else "exported",
                **{k: own.get(k) for k in ("method", "num_bases", "rank", "groups", "activation", "solver", "init",
                                           "steps", "dtype", "layers", "source_family")},
                "expert_params_original": before,
                "expert_params": after,
                "expert_reduction": 1 - after / max(1, before),
                "mean_rel_error": sum(errors) / len(errors) if errors else None,
            }
            return out
        if moe:
            out_dtype = resolve_dtype(dtype, gate_up_dtypes)
            m, r = choose_bases_rank(E, p, d, reduction, groups=groups, rank=rank, num_bases=num_bases)
            spec = MoBESpec(m, r, "silu", groups)
            plan = plan_method(method, E, p, d, spec)
            before = 2 * E * p * d  # gate + up per layer
            after = 2 * plan.params(E, p, d)
            saved = (before - after) * len(moe)
            # gate/up bytes as stored now vs as factor tensors in the output dtype (alpha is always fp32)
            block = reader.fp8_block or fp8.DEFAULT_BLOCK
            mobe_bytes = len(moe) * 2 * projection_bytes(plan.shapes(E, p, d), out_dtype, block)
            output_bytes = size - stored_gate_up + mobe_bytes
            tb = source_target_bytes(E, p, d, gate_up_dtypes, block)
            ws = working_set_bytes(E, p, d, m, r, groups, solver=solver, target_bytes=tb)
            if estimate_on is not None and plan.method == "mobe":
                dev_kind = "cpu" if estimate_on == "cpu" else "cuda"
                budget = parse_size(max_gpu_memory, "--max-gpu-memory") if max_gpu_memory else None
                prec = resolve_precision(precision, dev_kind, calibrated=calib_tokens is not None)
                est = estimate(E, p, d, spec, solver=solver, precision=prec,
                               steps=steps, projections=len(moe) * len(PROJECTIONS), targets=tb, device=estimate_on,
                               budget=budget, metric_rank=None if calib_tokens is None else calib_rank).as_dict()
                out["estimate"] = est
                if calib_tokens is not None:
                    active = total - expert + expert * fam.top_k // max(E, 1)
                    rc = parse_config(reader.config, reader.config_path)  # the runtime's reading of the heads
                    width = rc.num_heads * (rc.v_head_dim or rc.head_dim)
                    calib = calib_estimate(E=E, d=d, top_k=fam.top_k, layers=fam.num_layers, compressed_layers=len(moe),
                                           tokens=calib_tokens, ctx=calib_ctx, rank=calib_rank, active_params=active,
                                           attention_width=width, checkpoint_bytes=size, device=estimate_on)
                    est["calib"] = calib
                    est["hours"] += calib["seconds"] / 3600
            out["projection"] = {
                "method": plan.method, "num_bases": plan.num_bases, "rank": plan.rank, "groups": plan.groups,
                "dtype": dtype_key(out_dtype),
                "params_after": total - saved,
                "expert_params_after": expert - saved,
                "total_reduction": saved / max(1, total),
                "expert_reduction": saved / max(1, expert),
                "output_bytes": output_bytes,
                "source_bytes_ratio": output_bytes / max(1, size),
                "peak_host_bytes_per_layer": int(ws["host"]),
                "peak_device_bytes_per_layer": int(ws["device"]),
            }
        return out
