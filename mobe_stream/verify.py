"""`verify`: is this checkpoint directory complete, uncorrupted and consistent with its config?

Returns a list of problems (empty = fine). Cheap checks (manifest sizes, index vs headers, shapes)
always run; the sha256 of every shard and the NaN/Inf scan of compressed tensors are the expensive
part (`full=True`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .checkpoint import mobe_format
from .checkpoint.families import PROJS as EXPERT_PROJS, FUSED, fused_name, get_family, per_expert_name
from .checkpoint.reader import CheckpointReader
from .checkpoint.writer import verify_manifest
from .errors import CheckpointError, MobeError
from .factorize import METHODS, MethodPlan


def verify(model_dir: str | Path, full: bool = True) -> list[str]:
    d = Path(model_dir)
    problems: list[str] = []
    problems += _check_manifest(d, full)
    try:
        reader = CheckpointReader(d)  # validates index paths, every header, duplicates
    except MobeError as e:
        return problems + [str(e)]
    with reader:
        problems += _check_shapes(reader, d)
        if full:
            problems += _check_finite(reader)
    return problems


def _check_manifest(d: Path, full: bool) -> list[str]:
    problems = verify_manifest(d, full=full)
    if problems and problems[0].endswith(": missing"):
        return [problems[0] + " (cannot check shard integrity)"]
    try:
        listed = set(json.loads((d / "manifest.json").read_text())["shards"])
    except (OSError, ValueError, KeyError):
        return problems
    problems += [f"{p}: shard not listed in manifest.json" for p in sorted(d.glob("*.safetensors")) if p.name not in listed]
    return problems


def _expect(reader: CheckpointReader, name: str, shape: tuple, problems: list[str]) -> None:
    if name not in reader:
        problems.append(f"{reader.model_dir}: tensor {name} is missing")
    elif tuple(reader.info(name).shape) != tuple(shape):
        problems.append(f"{reader.model_dir}: tensor {name} has shape {tuple(reader.info(name).shape)}, config implies {tuple(shape)}")


def _check_shapes(reader: CheckpointReader, d: Path) -> list[str]:
    problems: list[str] = []
    try:
        fam = get_family(reader.config, reader)
    except MobeError as e:
        return [str(e)]
    E, p, hid = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
    mobe = reader.config.get("mobe")
    mobe_layers = set(mobe["layers"]) if mobe else set()
    for layer in fam.moe_layers():
        _expect(reader, fam.router_weight_name(layer), (E, hid), problems)
        pre = fam.experts_prefix(layer)
        projs = ("down_proj",) if layer in mobe_layers else EXPERT_PROJS
        if fam.layout == FUSED:
            if "gate_proj" in projs:
                _expect(reader, fused_name(pre, "gate_proj"), (E, 2 * p, hid), problems)
            _expect(reader, fused_name(pre, "down_proj"), (E, hid, p), problems)
        else:
            for proj in projs:
                shape = (hid, p) if proj == "down_proj" else (p, hid)
                for e in range(E):
                    _expect(reader, per_expert_name(pre, e, proj), shape, problems)
    if mobe:
        try:
            plan = MethodPlan.from_config(mobe)
        except (KeyError, TypeError, ValueError) as e:
            return problems + [f"{d / 'config.json'}: malformed 'mobe' block ({e!r})"]
        if plan.method not in METHODS:
            return problems + [f"{d / 'config.json'}: unknown mobe method {plan.method!r}"]
        shapes = plan.shapes(E, p, hid)
        for layer in mobe["layers"]:
            for proj in mobe.get("projections", mobe_format.PROJECTIONS):
                for suffix, shape in shapes.items():
                    _expect(reader, mobe_format.factor_name(fam.experts_prefix(layer), proj, suffix), shape, problems)
    return problems


SUPPORTED_WEIGHT_DTYPES = {"F32", "BF16", "F16", "F8_E4M3"}


def check_source(reader: CheckpointReader, fam) -> None:
    """Before compressing: expert tensors exist with the config's shapes and a dtype we can read."""
    problems = _check_shapes(reader, reader.model_dir)
    if problems:
        raise CheckpointError(problems[0].split(": ", 1)[1] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                              reader.model_dir)
    for layer in fam.moe_layers():
        for proj in EXPERT_PROJS:
            for name in fam.expert_tensor_names(layer, proj):
                dt = reader.info(name).dtype
                if not name.endswith("_scale_inv") and dt not in SUPPORTED_WEIGHT_DTYPES:
                    raise CheckpointError(f"tensor {name} has unsupported dtype {dt} (supported: "
                                          f"{', '.join(sorted(SUPPORTED_WEIGHT_DTYPES))})",
                                          reader.model_dir / reader.info(name).shard)


def _check_finite(reader: CheckpointReader) -> list[str]:
    bad = []
    for name in reader.names():
        if mobe_format.is_factor(name) and not torch.isfinite(reader.get(name, torch.float32)).all():
            bad.append(f"{reader.model_dir}: tensor {name} contains NaN or Inf")
    return bad
