"""An output directory's lifecycle, shared by `compress` and `export`: made safe, opened (new,
resumed or overwritten), filled unit by unit, finished, checked.

Nothing here knows what the tensors mean (that is mobe_output.py for compress, export.py for
export). What it guarantees: the source is never reached through the output (compared by device
and inode, so a bind mount or a symlink is caught, not only an equal path); nothing we did not
write is ever deleted; every unit is journaled only after its shards are on disk.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from ..checkpoint.fingerprint import SourceFingerprint
from ..checkpoint.hub_cache import containment_root
from ..checkpoint.mobe_format import CARD_NAME, JOURNAL_NAME, LOCK_NAME, MODELING_FILE, SOURCE_NAMES
from ..checkpoint.safetensors_io import atomic_file, atomic_write_bytes, sha256_file
from ..checkpoint.writer import ShardWriter
from ..errors import ConfigError, ResourceError
from ..memory import release_freed_memory
from ..paths import is_inside
from .dist import world_from_env
from .events import Reporter
from .journal import STATE_DIR, Journal

# What a run of ours writes at the top of an output dir; --overwrite deletes these and nothing else.
_SHARD = re.compile(r"^model-\d{5,}\.safetensors$")
_OWN_NAMES = {"model.safetensors.index.json", "manifest.json", "config.json", JOURNAL_NAME, JOURNAL_NAME + ".lock",
              STATE_DIR, CARD_NAME,
              MODELING_FILE, *SOURCE_NAMES.values()}
# Files of the source that are weights or that we write ourselves; every other regular file is copied.
_NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")
_NOT_COPIED_NAMES = {"model.safetensors.index.json", "config.json", "manifest.json", JOURNAL_NAME, LOCK_NAME,
                     MODELING_FILE}  # ours is written fresh; a source's own remote code is never carried along
_COPY_CHUNK = 16 * 2**20


def check_not_overlapping(src: Path, out: Path) -> None:
    """Refuse an output that is, contains or lies inside the source, however it is reached (paths.is_inside)."""
    if is_inside(out, src) or is_inside(src, out):
        raise ConfigError(f"{out}: output directory must not be, contain or lie inside the source {src}")


def prepare(out: Path) -> None:
    """Create `out` (and parents); a file in its place or an unwritable location is a one-line error."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{out}: --out exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
    except OSError as e:
        raise ConfigError(f"{out}: cannot write to the output directory ({e.strerror or e})") from None


def foreign_entries(out: Path) -> list[str]:
    return sorted(e.name for e in out.iterdir() if e.name != LOCK_NAME) if out.exists() else []


def _ours(name: str, side_files: set[str]) -> bool:
    return name in _OWN_NAMES or name in side_files or bool(_SHARD.match(name)) or ".tmp-" in name


def clear(out: Path, side_files: Iterable[str] = ()) -> list[str]:
    """Delete what an earlier run of ours wrote (shards, index, manifest, config, journal, solver
    state, copied side files, temporaries) and nothing else; returns the entries left alone."""
    side = set(side_files)
    kept = []
    for e in out.iterdir():
        if e.name == LOCK_NAME:
            continue
        if not _ours(e.name, side):
            kept.append(e.name)
        elif e.is_dir() and not e.is_symlink():
            shutil.rmtree(e)
        else:
            e.unlink()
    return sorted(kept)


def remove_temporaries(out: Path) -> None:
    for d in (out, out / STATE_DIR):
        if d.is_dir():
            for e in d.iterdir():
                if ".tmp-" in e.name:
                    e.unlink(missing_ok=True)


def open_journal(out: Path, settings: dict, fingerprint: SourceFingerprint, *, resume: bool, overwrite: bool, reporter: Reporter,
                 side_files: Iterable[str] = ()) -> Journal:
    """Start a run in `out` or pick up the journaled one, refusing anything that could lose work.

    A directory with files but no journal of ours is never cleared, --overwrite or not: it may be
    anything (another model, a git checkout) and we did not write it.
    """
    journal = Journal.load(out)
    if journal is None:
        leftovers = foreign_entries(out)
        if leftovers:
            raise ConfigError(f"{out}: output directory is not empty ({leftovers[0]} ...) and holds no mobe-stream "
                              f"journal; refusing to touch files this tool did not write (choose a new or empty --out)")
        return Journal.create(out, settings, fingerprint)
    if not resume:
        if not overwrite:
            raise ConfigError(f"{out}: output directory holds an earlier run; pass --resume to continue it "
                              f"or --overwrite to start over")
        kept = clear(out, side_files)
        if kept:
            reporter.event("warning", text=f"{out}: --overwrite kept {len(kept)} entr{'y' if len(kept) == 1 else 'ies'} "
                                           f"this tool did not write ({kept[0]} ...)")
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


def write_unit(out: Path, journal: Journal, key: str, items: Iterable[tuple[str, torch.Tensor]], max_shard_bytes: int,
               reporter: Reporter, info: dict, seconds_before: float = 0.0, announce: bool = True) -> None:
    """Stream (name, tensor) items into shards capped at max_shard_bytes, then journal the unit.

    At most one shard's worth of tensors is pending in RAM at a time.
    """
    t0 = time.monotonic()
    if announce:
        reporter.event("unit_start", unit=key, kind=info.get("kind", "copy"), tensors=info.get("tensors"))
    writer = ShardWriter(out, max_shard_size=max_shard_bytes, start_index=journal.allocate_shard_index())
    records: list = []
    try:
        last = 0.0
        for i, (name, tensor) in enumerate(items):
            writer.add(name, tensor)
            if writer.pending_bytes >= max_shard_bytes:
                records.extend(writer.flush())
            if announce and time.monotonic() - last >= 0.5:  # progress, not one event per tensor
                reporter.event("copy", unit=key, done=i + 1)
                last = time.monotonic()
        records.extend(writer.flush())
    except OSError as e:
        if e.errno in (errno.ENOSPC, errno.EDQUOT):
            raise ResourceError(f"disk full while writing {key} ({e.strerror}); free space and rerun with --resume",
                                e.filename or out) from None
        raise
    info = {**info, "seconds": seconds_before + time.monotonic() - t0}
    world = world_from_env()
    if world.size > 1:
        info["rank"] = world.rank  # who did it (distributed runs)
    journal.commit(key, records, info, writer.next_index)
    del writer, items
    release_freed_memory()  # RSS must not creep with depth
    reporter.event("unit_done", unit=key, **info)


def renumber_shards(out: Path, journal: Journal, order: list[str]) -> None:
    """Name the shards model-00001... in plan order (a distributed run wrote them in completion
    order under reserved indices): the output does not depend on which rank finished first. A
    no-op for a single process, which writes in plan order."""
    records = [rec for key in order for rec in journal.units[key]["shards"]]
    names = [f"model-{i:05d}.safetensors" for i in range(1, len(records) + 1)]
    if [r["filename"] for r in records] == names:
        return
    for rec in records:  # two steps, so that no new name lands on a file not yet moved
        os.replace(out / rec["filename"], out / (rec["filename"] + ".renumber"))
    for rec, name in zip(records, names, strict=True):
        os.replace(out / (rec["filename"] + ".renumber"), out / name)
        rec["filename"] = name
    journal.data["next_shard_index"] = len(records) + 1
    journal.save()


def remove_orphan_shards(out: Path, journal: Journal) -> None:
    """Shards not recorded by the journal come from a unit that was killed before it was journaled."""
    known = {rec["filename"] for u in journal.units.values() for rec in u["shards"]}
    for e in out.glob("model-*.safetensors"):
        if e.name not in known and _SHARD.match(e.name):
            e.unlink()


def verify_units(journal: Journal) -> list[tuple[str, str]]:
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


def side_files(src: Path) -> list[Path]:
    """The source's small non-weight files that travel with the model (tokenizer, generation config,
    license...), symlinks leaving the model dir (or a cache snapshot's models--* tree) excluded."""
    out = []
    root = containment_root(src)
    for e in sorted(src.iterdir()):
        if e.name in _NOT_COPIED_NAMES or e.name.endswith(_NOT_COPIED_SUFFIXES) or not e.is_file():
            continue
        if root not in e.resolve().parents:
            continue
        out.append(e)
    return out


def side_files_bytes(src: Path) -> int:
    return sum(e.stat().st_size for e in side_files(src))


def side_file_target(src: Path, name: str) -> str | None:
    """Where a side file of `src` goes: the source's README/LICENSE under SOURCE_* names (the output
    gets its own card); a compact output's card, and SOURCE_* files already renamed, keep their names;
    None: not copied (a compact output's card when exporting: the export writes its own)."""
    if name == CARD_NAME and (src / SOURCE_NAMES[CARD_NAME]).exists():
        return None
    return SOURCE_NAMES.get(name, name)


def write_modeling_file(out: Path) -> None:
    """The transformers modeling file of a compact output (mobe_stream/hf/modeling_mobe.py)."""
    from importlib.resources import files

    atomic_write_bytes(out / MODELING_FILE, files("mobe_stream.hf").joinpath(MODELING_FILE).read_bytes())


def copy_side_files(src: Path, out: Path) -> list[str]:
    """Stream each side file to a temporary name, fsync, rename (never read whole into RAM)."""
    copied = []
    for e in side_files(src):
        target = side_file_target(src, e.name)
        if target is None:
            continue
        try:
            with open(e.resolve(), "rb") as fin, atomic_file(out / target) as fout:
                while chunk := fin.read(_COPY_CHUNK):
                    fout.write(chunk)
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                raise ResourceError(f"disk full while copying {e.name} ({err.strerror}); free space and rerun with "
                                    f"--resume", out / e.name) from None
            raise
        copied.append(target)
    return copied


def self_check(out: Path, verify: Callable[[Path], list[str]]) -> None:
    """The cheap part of `verify` on our own output: a failure here is a bug or a disk problem."""
    problems = verify(out)
    if problems:
        raise ConfigError(f"{out}: output failed verification: " + "; ".join(problems[:5]))
