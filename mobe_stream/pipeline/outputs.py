"""Output directory: safety checks, clearing, verification on resume, MoBE tensors, finalization."""

from __future__ import annotations

import errno
import shutil
import time
from pathlib import Path

import torch

from ..checkpoint.fingerprint import SourceFingerprint
from ..checkpoint.safetensors_io import atomic_write_bytes, atomic_write_json, sha256_file
from ..checkpoint.writer import ShardWriter, write_index_and_manifest
from ..errors import ConfigError, ResourceError
from ..factorize import LowRankFactors
from ..memory import release_freed_memory
from .journal import JOURNAL_NAME, Journal
from .lock import LOCK_NAME
from .plan import PROJECTIONS

FORMAT_VERSION = 1
# Files of the source that are weights or that we write ourselves; everything else small is copied.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_NOT_COPIED_NAMES = {"model.safetensors.index.json", "config.json", "manifest.json", JOURNAL_NAME, LOCK_NAME}


def check_not_overlapping(src: Path, out: Path) -> None:
    if out == src or src in out.parents or out in src.parents:
        raise ConfigError(f"{out}: output directory must not be, contain or lie inside the source {src}")


def foreign_entries(out: Path) -> list[str]:
    return sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME) if out.exists() else []


def clear(out: Path) -> None:
    """Empty the output directory (keeping our lock). Only called for --overwrite or a new run."""
    for e in out.iterdir():
        if e.name == LOCK_NAME:
            continue
        if e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()


def remove_temporaries(out: Path) -> None:
    for d in (out, out / ".mobe-state"):
        if d.is_dir():
            for e in d.iterdir():
                if ".tmp-" in e.name:
                    e.unlink(missing_ok=True)


def open_journal(out: Path, settings: dict, fingerprint: SourceFingerprint, *, resume: bool, overwrite: bool, reporter) -> Journal:
    """Start a run in `out` or pick up the journaled one, refusing anything that could lose work."""
    journal = Journal.load(out)
    if journal is None:
        leftovers = foreign_entries(out)
        if leftovers and not overwrite:
            raise ConfigError(f"{out}: output directory is not empty ({leftovers[0]} ...) and holds no "
                              f"mobe-stream journal; pass --overwrite to replace it")
        clear(out)
        return Journal.create(out, settings, fingerprint)
    if not resume:
        if not overwrite:
            raise ConfigError(f"{out}: output directory holds an earlier run; pass --resume to continue it "
                              f"or --overwrite to start over")
        clear(out)
        return Journal.create(out, settings, fingerprint)
    diffs = journal.differences(settings, fingerprint)
    if diffs:
        raise ConfigError(f"{journal.path}: cannot resume, this run differs from the one being resumed: " + "; ".join(diffs))
    remove_temporaries(out)
    for key, problem in verify_units(journal):
        reporter.event("warning", text=f"{key}: {problem}; redoing it")
        journal.forget(key)
    remove_orphan_shards(out, journal)
    done = len(journal.units)
    reporter.event("resume", text=f"resuming: {done} finished unit(s) verified against their sha256", done_units=done)
    return journal


def write_unit(out: Path, journal: Journal, key: str, items, max_shard_bytes: int, reporter, info: dict,
               seconds_before: float = 0.0, announce: bool = True) -> None:
    """Stream (name, tensor) items into shards capped at max_shard_bytes, then journal the unit.

    At most one shard's worth of tensors is pending in RAM at a time.
    """
    t0 = time.monotonic()
    if announce:
        reporter.event("unit_start", unit=key, kind=info.get("kind", "copy"), tensors=info.get("tensors"))
    writer = ShardWriter(out, max_shard_size=max_shard_bytes, start_index=journal.allocate_shard_index())
    records: list = []
    try:
        for i, (name, tensor) in enumerate(items):
            writer.add(name, tensor)
            if writer.pending_bytes >= max_shard_bytes:
                records.extend(writer.flush())
            if announce:
                reporter.event("copy", unit=key, done=i + 1)
        records.extend(writer.flush())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"disk full while writing {key} ({e.strerror}); free space and rerun with --resume",
                                e.filename or out) from None
        raise
    info = {**info, "seconds": seconds_before + time.monotonic() - t0}
    journal.commit(key, records, info, writer.next_index)
    del writer, items
    release_freed_memory()  # RSS must not creep with depth
    reporter.event("unit_done", unit=key, **info)


def remove_orphan_shards(out: Path, journal) -> None:
    """Shards not recorded by the journal come from a unit that was killed before it was journaled."""
    known = {rec["filename"] for u in journal.units.values() for rec in u["shards"]}
    for e in out.glob("model-*.safetensors"):
        if e.name not in known:
            e.unlink()


def verify_units(journal) -> list[tuple[str, str]]:
    """Finished units whose shards are missing or differ from the sha256 recorded when written."""
    bad = []
    for key, unit in journal.units.items():
        for rec in unit["shards"]:
            path = journal.path.parent / rec["filename"]
            if not path.is_file():
                bad.append((key, f"shard {rec['filename']} is missing"))
                break
            if path.stat().st_size != rec["size"] or sha256_file(path) != rec["sha256"]:
                bad.append((key, f"shard {rec['filename']} does not match its recorded sha256"))
                break
    return bad


def factor_tensors(job, unit, factors, std: float) -> dict[str, torch.Tensor]:
    """The stored tensors of one projection (FORMAT.md); the target std is folded into A (or U and the mean)."""
    prefix = f"model.layers.{unit.layer}.mlp.experts.{unit.proj}."
    scale = float(std) * float(getattr(factors, "scale", 1.0))
    if isinstance(factors, LowRankFactors):
        out = {prefix + "lowrank_U": (factors.U.float() * scale).to(job.out_dtype).contiguous(),
               prefix + "lowrank_V": factors.V.to(job.out_dtype).contiguous()}
        if factors.mean is not None:
            out[prefix + "lowrank_mean"] = (factors.mean.float() * scale).to(job.out_dtype).contiguous()
        return out
    return {
        prefix + "mobe_A": (factors.A.float() * scale).to(job.out_dtype).contiguous(),
        prefix + "mobe_B": factors.B.to(job.out_dtype).contiguous(),
        prefix + "mobe_alpha": factors.alpha.float().contiguous(),
    }


def copy_side_files(src: Path, out: Path) -> list[str]:
    copied = []
    for e in sorted(src.iterdir()):
        if e.name in _NOT_COPIED_NAMES or e.name.endswith(_NOT_COPIED_SUFFIXES) or not e.is_file():
            continue
        real = e.resolve()
        if src not in real.parents:  # a symlink leaving the model dir is not followed
            continue
        atomic_write_bytes(out / e.name, real.read_bytes())  # tokenizer/config-sized files
        copied.append(e.name)
    return copied


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _mobe_block(job, journal) -> dict:
    errors: dict[str, dict[str, float]] = {}
    for key, u in journal.units.items():
        if u["info"].get("kind") == "factorize":
            _, layer, proj = key.split(".")
            errors.setdefault(layer, {})[proj] = u["info"]["rel_error"]
    return {
        "format_version": FORMAT_VERSION,
        **job.plan.config(),
        "solver": job.opts.solver if job.plan.method == "mobe" else None,
        "init": job.opts.init if job.plan.method == "mobe" else None,
        "projections": list(PROJECTIONS),
        "layers": job.layers,
        "layout": job.family.layout,
        "dtype": str(job.out_dtype).replace("torch.", ""),
        "errors": errors,
        "source_family": job.family.name,
        "steps": job.opts.steps,
    }


def summarize(job, journal) -> dict:
    fam = job.family
    E, p, d = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
    before_layer = 3 * E * p * d
    after_layer = E * p * d + 2 * job.plan.params(E, p, d)
    rows = []
    for layer in job.layers:
        units = {proj: journal.units.get(f"layer.{layer}.{proj}", {}).get("info", {}) for proj in PROJECTIONS}
        copy = journal.units.get(f"layer.{layer}.copy", {}).get("info", {})
        rows.append({
            "layer": layer,
            **{proj: units[proj].get("rel_error") for proj in PROJECTIONS},
            "seconds": sum(u.get("seconds", 0.0) for u in (*units.values(), copy)),
            "params_before": before_layer,
            "params_after": after_layer,
        })
    total_before = sum(_numel(job.reader.info(n).shape) for n in job.reader.names()
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


def finalize(job, journal, units) -> dict:
    """Index + manifest (from the journal's shard records), config with the `mobe` block, side files.

    Idempotent: a resumed run that finds everything done just rewrites these small files.
    """
    records = [rec for u in units for rec in journal.units[u.key]["shards"]]
    for rec in records:  # cheap verification of our own output (the full sha256 check is `verify`)
        path = job.out / rec["filename"]
        if not path.is_file() or path.stat().st_size != rec["size"]:
            raise ConfigError(f"{path}: shard missing or of the wrong size after writing; rerun with --resume")
    write_index_and_manifest(job.out, records, {"mobe_format_version": str(FORMAT_VERSION)})
    config = dict(job.reader.config)
    config["mobe"] = _mobe_block(job, journal)
    atomic_write_json(job.out / "config.json", config)
    copy_side_files(job.src, job.out)
    return summarize(job, journal)


def self_check(out: Path) -> None:
    """The cheap part of `verify` on our own output: a failure here is a bug or a disk problem."""
    from ..verify import verify

    problems = verify(out, full=False)
    if problems:
        raise ConfigError(f"{out}: output failed verification: " + "; ".join(problems[:5]))
