"""Split a checkpoint into units of work: copied tensors per layer, and factorized projections.

A unit is the resume granularity: it is either finished (its shards are in the journal) or redone.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..checkpoint.families import layer_of
from ..checkpoint.mobe_format import PROJECTIONS

__all__ = ["PROJECTIONS", "Unit", "parse_layers", "plan_units"]


@dataclass
class Unit:
    key: str
    kind: str  # "copy" | "factorize"
    layer: int | None = None
    proj: str | None = None
    tensors: list[str] = field(default_factory=list)  # for copy units


def parse_layers(spec: str | None, available: list[int]) -> list[int]:
    """`"1-3,7"` -> [1, 2, 3, 7], restricted to and checked against the MoE layers available."""
    if spec is None or spec.strip() in ("", "all"):
        return list(available)
    chosen: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(x) for x in part.split("-", 1))
                if a > b:
                    raise ValueError(f"--layers range {part!r} runs backwards (write {b}-{a})")
                chosen.update(range(a, b + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise ValueError(f"bad --layers entry {part!r} (use e.g. 1-3,7)") from None
    if not chosen:
        raise ValueError(f"--layers {spec!r} names no layer (use e.g. 1-3,7)")
    missing = sorted(chosen - set(available))
    if missing:
        raise ValueError(f"--layers names layers that are not MoE layers: {missing} "
                         f"(MoE layers: {available[0]}..{available[-1]})" if available else "model has no MoE layers")
    return sorted(chosen)


def plan_units(names: list[str], compress_layers: list[int], excluded: set[str]) -> list[Unit]:
    """Units in file order: globals first, then per layer: gate_proj, up_proj (if compressed), copy."""
    by_layer: dict[int | None, list[str]] = {}
    for name in names:
        if name in excluded:
            continue
        by_layer.setdefault(layer_of(name), []).append(name)
    units: list[Unit] = []
    if None in by_layer:
        units.append(Unit("globals", "copy", None, None, by_layer.pop(None)))
    for layer in sorted({k for k in by_layer if k is not None} | set(compress_layers)):
        if layer in compress_layers:
            for proj in PROJECTIONS:
                units.append(Unit(f"layer.{layer}.{proj}", "factorize", layer, proj))
        if by_layer.get(layer):
            units.append(Unit(f"layer.{layer}.copy", "copy", layer, None, by_layer[layer]))
    return units
