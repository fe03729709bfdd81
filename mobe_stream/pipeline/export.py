"""`export`: MoBE checkpoint -> standard MoE checkpoint in the source family's exact layout.

Streams layer by layer: each compressed projection's experts are rebuilt (W_e = A_e M_e) a chunk of
experts at a time and written with the source's tensor names (per-expert or fused). Resumable
through the same journal, lock and atomic shards as `compress`.

Before any output: the source's shard sizes against its manifest.json, and the projected output
bytes against the free disk. Each source shard's sha256 is checked before its tensors are used
(source_check.py: 6-12 extra minutes of hashing for a 700 GB compressed Kimi-K2). Ctrl-C or
SIGTERM stops it at once with exit 130 (pipeline/signals.py), and `--resume` redoes only the
unfinished unit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from ..checkpoint import fp8, mobe_format
from ..checkpoint.families import Family, get_family, layer_of
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.safetensors_io import atomic_write_json
from ..checkpoint.writer import write_index_and_manifest
from ..dtypes import AUTO, dtype_key, dtype_name, short_name, to_torch
from ..errors import ConfigError
from ..factorize import MethodPlan, factors_from_tensors
from ..memory import pin_mmap_threshold
from ..sizes import parse_size
from ..verify import verify
from . import outdir, preflight
from .events import Reporter
from .job import StopFlag
from .journal import Journal
from .lock import OutputLock
from .signals import catch_signals
from .source_check import SourceShards

EXPORT_DTYPES = {short_name(k): to_torch(k) for k in ("bf16", "fp16", "fp32", "fp8")}  # keyed by dtypes.py's short names


@dataclass
class ExportOptions:
    dtype: str = AUTO
    max_shard_size: str = "5GB"
    expert_chunk: int = 32
    resume: bool = False
    overwrite: bool = False


def _target_dtype(cfg: dict, opts: ExportOptions) -> str:
    src_fp8 = (cfg.get("quantization_config") or {}).get("quant_method") == "fp8"
    name = dtype_name(opts.dtype, "--dtype", fp8=True)
    if name == AUTO:
        name = "fp8" if src_fp8 else {"float32": "fp32", "float16": "fp16"}.get(cfg["mobe"].get("dtype"), "bf16")
    name = short_name(name)  # the journal records the short name
    if name == "fp8" and not src_fp8:
        raise ConfigError("--dtype fp8 needs a source that was FP8 block-quantized (DeepSeek-V3/Kimi-K2 release format)")
    return name


def export(src: str | Path, out: str | Path, opts: ExportOptions, reporter: Reporter | None = None) -> dict:
    reporter = reporter or Reporter()
    src, out = Path(src).resolve(), Path(out).resolve()
    outdir.check_not_overlapping(src, out)
    pin_mmap_threshold()
    reader = CheckpointReader(src)
    try:
        cfg = reader.config
        mobe = cfg.get("mobe")
        if not mobe:
            raise ConfigError(f"{src / 'config.json'}: not a MoBE checkpoint (no 'mobe' block); nothing to export")
        if mobe.get("format_version") != 1:
            raise ConfigError(f"{src / 'config.json'}: unsupported MoBE format_version {mobe.get('format_version')!r}")
        target = _target_dtype(cfg, opts)
        max_shard = parse_size(opts.max_shard_size, "--max-shard-size")
        family = get_family(cfg, reader)
        settings = {"method": "export", "dtype": target, "max_shard_size": max_shard}
        warn = lambda t: reporter.event("warning", text=t)  # noqa: E731
        source = SourceShards(reader, warn)
        units = _plan(reader)
        block = tuple(reader.fp8_block or fp8.DEFAULT_BLOCK)
        outdir.prepare(out)
        # Ctrl-C/SIGTERM stop at once (exit 130, lock released): an export unit is cheap to redo
        with OutputLock(out, warn=warn), catch_signals(StopFlag(), reporter, immediate=True):
            _preflight(src, out, reader, family, mobe, units, target, block, opts, warn)
            journal = outdir.open_journal(out, settings, reader.fingerprint(), resume=opts.resume,
                                          overwrite=opts.overwrite, reporter=reporter,
                                          side_files=[e.name for e in outdir.side_files(src)])
            todo = [u for u in units if not journal.done(u[0])]
            reporter.event("plan", total_units=len(units), done_units=len(units) - len(todo), source=str(src))
            for key, layer, names in todo:
                source.check(sorted({reader.info(n).shard for n in names}))
                items = _unit_items(reader, family, mobe, layer, names, target, block, opts.expert_chunk)
                outdir.write_unit(out, journal, key, items, max_shard, reporter, {"kind": "export", "tensors": len(names)})
            records = [rec for key, _, _ in units for rec in journal.units[key]["shards"]]
            write_index_and_manifest(out, records, {"exported_from": "mobe"})
            atomic_write_json(out / "config.json", _export_config(cfg, target))
            outdir.copy_side_files(src, out)
            outdir.self_check(out, lambda d: verify(d, full=False, own_run=True))
            journal.mark_complete()
        summary = {"source": str(src), "output": str(out), "dtype": dtype_key(EXPORT_DTYPES[target]),
                   "layers": mobe["layers"]}
        reporter.event("message", text=f"exported {src} -> {out} ({target})")
        return summary
    finally:
        reader.close()


def _preflight(src: Path, out: Path, reader: CheckpointReader, family: Family, mobe: dict, units: list,
               target: str, block, opts: ExportOptions, warn) -> None:
    """Refuse before the journal is written when the output will not fit. Units a resumed run
    finished are not counted; shards an --overwrite deletes count as free."""
    old = Journal.load(out)
    done = set(old.units) if old is not None and opts.resume else set()
    reclaimed = 0
    if old is not None and opts.overwrite and not opts.resume:
        reclaimed = sum(int(rec["size"]) for u in old.units.values() for rec in u["shards"])
    todo = [u for u in units if u[0] not in done]
    need = _projected_bytes(reader, family, mobe, todo, target, block) + outdir.side_files_bytes(src) - reclaimed
    preflight.check(out, max(0, need), None, force=False, warn=warn, remedy="free space or choose another --out")


def _projected_bytes(reader: CheckpointReader, family: Family, mobe: dict, units: list, target: str, block) -> int:
    """Bytes the units will write: kept tensors as `_kept_dtype` says, rebuilt experts [E, p, d] per
    compressed projection in the target dtype (fp8: 1 byte + fp32 block scales)."""
    E, p, d = family.num_experts, family.moe_intermediate_size, family.hidden_size
    shapes = [(2 * p, d)] if mobe["layout"] == "fused" else [(p, d)] * len(mobe_format.PROJECTIONS)  # bytes only
    item = EXPORT_DTYPES[target].itemsize
    rebuilt = sum(E * r * c * item for r, c in shapes)
    if target == "fp8":
        rebuilt += sum(E * math.prod(fp8.scale_shape(s, block)) * 4 for s in shapes)
    total = 0
    for _, layer, names in units:
        for name in names:
            kept = None if mobe_format.is_factor(name) else _kept_dtype(reader, name, target)
            if kept is not None:
                info = reader.info(name)
                total += info.nbytes if kept == "stored" else math.prod(info.shape) * EXPORT_DTYPES[target].itemsize
        if layer is not None and layer in mobe["layers"]:
            total += rebuilt
    return total


def _plan(reader: CheckpointReader) -> list[tuple[str, int | None, list[str]]]:
    by_layer: dict[int | None, list[str]] = {}
    for name in reader.names():
        by_layer.setdefault(layer_of(name), []).append(name)
    units: list[tuple[str, int | None, list[str]]] = [("globals", None, by_layer.pop(None))] if None in by_layer else []
    units += [(f"layer.{layer}", layer, names) for layer, names in sorted(by_layer.items())]
    return units


def _export_config(cfg: dict, target: str) -> dict:
    out = {k: v for k, v in mobe_format.source_config(cfg).items() if k != "mobe"}  # the source's architecture again
    out[mobe_format.EXPORT_KEY] = cfg["mobe"]  # what it was (inspect says so); loaders ignore unknown config keys
    if target != "fp8":
        out.pop("quantization_config", None)  # everything is dequantized: the config must not claim FP8
        key = "dtype" if "dtype" in out else "torch_dtype"
        out[key] = dtype_key(EXPORT_DTYPES[target])
    return out


def _kept_dtype(reader: CheckpointReader, name: str, target: str) -> str | None:
    """How a kept tensor is written: None (an FP8 scale, dropped when dequantizing), "stored" (raw,
    bit-exact; FP8 stays FP8 for an fp8 export) or `target` (FP8 dequantized)."""
    if name.endswith(fp8.SCALE_SUFFIX) and target != "fp8":
        return None
    return target if reader.info(name).dtype == "F8_E4M3" and target != "fp8" else "stored"


def _convert(reader: CheckpointReader, name: str, target: str):
    """A kept tensor as `_kept_dtype` says (None: not written)."""
    kept = _kept_dtype(reader, name, target)
    if kept is None:
        return None
    return reader.get(name) if kept == "stored" else reader.get(name, EXPORT_DTYPES[kept])


def _unit_items(reader: CheckpointReader, family: Family, mobe: dict, layer: int | None, names: list[str],
               target: str, block, chunk: int):
    for name in names:
        if mobe_format.is_factor(name):
            continue
        t = _convert(reader, name, target)
        if t is not None:
            yield name, t
    if layer is None or layer not in mobe["layers"]:
        return
    pre = family.experts_prefix(layer)
    if mobe["layout"] == "fused":
        gate = torch.cat(list(_rebuilt(reader, mobe, pre, "gate_proj", chunk)))
        up = torch.cat(list(_rebuilt(reader, mobe, pre, "up_proj", chunk)))
        fused = family.form.join(gate, up)  # the family's own fused form
        del gate, up
        yield from _emit(family.fused_tensor_name(layer, "gate_proj"), fused, target, block)
        return
    for proj in mobe_format.PROJECTIONS:
        e0 = 0
        for W in _rebuilt(reader, mobe, pre, proj, chunk):
            for i in range(W.shape[0]):
                yield from _emit(family.expert_name(layer, e0 + i, proj), W[i].clone(), target, block)
            e0 += W.shape[0]


def _emit(name: str, w: torch.Tensor, target: str, block):
    if target == "fp8":
        if w.dim() == 3:
            qs = [fp8.quantize(x, block) for x in w]
            yield name, torch.stack([q for q, _ in qs])
            yield fp8.scale_name(name), torch.stack([s for _, s in qs])
        else:
            q, s = fp8.quantize(w, block)
            yield name, q
            yield fp8.scale_name(name), s
    else:
        yield name, w.to(EXPORT_DTYPES[target]).contiguous()


def _rebuilt(reader: CheckpointReader, mobe: dict, experts_prefix: str, proj: str, chunk: int):
    """Rebuilt expert weights [k, p, d] in fp32, `chunk` experts at a time (any method)."""
    plan = MethodPlan.from_config(mobe)
    names = mobe_format.factor_names(experts_prefix, proj, plan.shapes(1, 1, 1))
    f = factors_from_tensors(plan, {s: reader.get(n, torch.float32) for s, n in names.items()})
    E = f.num_experts
    for e0 in range(0, E, chunk):
        yield f.reconstruct(torch.arange(e0, min(E, e0 + chunk)))
