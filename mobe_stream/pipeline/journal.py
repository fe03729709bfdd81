"""The compress journal: which units are finished, in which shards, under which settings.

Rewritten atomically after every finished unit (a layer's copied tensors, or one factorized
projection), so a run killed at any moment resumes from the last finished unit.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path

from ..checkpoint.fingerprint import SourceFingerprint
from ..checkpoint.mobe_format import JOURNAL_COMPLETE, JOURNAL_NAME, STATE_DIR

__all__ = ["JOURNAL_NAME", "STATE_DIR", "Journal"]
from ..checkpoint.safetensors_io import atomic_write_json
from ..errors import CheckpointError, ConfigError
from ..sizes import parse_size

FORMAT = "mobe-stream-journal/1"


def upgrade_settings(settings: dict) -> dict:
    """Settings recorded by an older version, in today's terms (a copy): sizes parsed; no
    `precision` means the fp32 matmuls every earlier run used, which `auto` still is on a CPU (and
    no earlier version ran the solver on a GPU); no `schedule` means the constant lr they all used."""
    out = dict(settings)
    if isinstance(out.get("max_shard_size"), str):  # journals before sizes were stored parsed
        try:
            out["max_shard_size"] = parse_size(out["max_shard_size"])
        except ConfigError:
            pass
    if "solver" in out:  # a compress run's settings (export journals have none of these)
        out.setdefault("precision", "auto")
        out.setdefault("schedule", "constant")  # runs before --schedule stepped with a constant lr
    return out


class Journal:
    def __init__(self, out_dir: Path, data: dict):
        self.path = Path(out_dir) / JOURNAL_NAME
        self.data = data
        self.shard_stride = 0  # > 0 in distributed runs: each unit reserves this many shard indices

    @classmethod
    def create(cls, out_dir: Path, settings: dict, source_fingerprint: SourceFingerprint) -> Journal:
        j = cls(out_dir, {
            "format": FORMAT,
            "settings": settings,
            "source_fingerprint": source_fingerprint.to_json(),
            "units": {},
            "next_shard_index": 1,
            JOURNAL_COMPLETE: False,
        })
        j.save()
        return j

    @classmethod
    def load(cls, out_dir: Path) -> Journal | None:
        path = Path(out_dir) / JOURNAL_NAME
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError) as e:
            raise CheckpointError(f"unreadable journal ({e})", path) from e
        problem = _shape_problem(data)
        if problem:
            raise CheckpointError(f"not a mobe-stream journal ({problem})", path)
        return cls(out_dir, data)

    def differences(self, settings: dict, source_fingerprint: SourceFingerprint) -> list[str]:
        """What differs between this journal's run and the requested one (empty: same run)."""
        diffs = []
        old = upgrade_settings(self.data["settings"])
        for key in sorted(set(old) | set(settings)):
            if old.get(key) != settings.get(key):
                diffs.append(f"{key}: was {old.get(key)!r}, now {settings.get(key)!r}")
        try:
            started = SourceFingerprint.from_json(self.data["source_fingerprint"])
        except ValueError as e:
            raise CheckpointError(str(e), self.path) from None
        changes = source_fingerprint.changes_since(started)
        if changes:
            diffs.append("source checkpoint changed since the run started: " + ", ".join(changes)
                         + " (restore the original files, or pass --overwrite to start over)")
        return diffs

    @property
    def units(self) -> dict:
        return self.data["units"]

    def done(self, key: str) -> bool:
        return key in self.data["units"]

    def allocate_shard_index(self) -> int:
        if self.shard_stride:
            return self.reserve_shard_indices(self.shard_stride)
        return int(self.data["next_shard_index"])

    def commit(self, key: str, records: list, info: dict, next_shard_index: int) -> None:
        with self._locked():  # several ranks may commit: merge with what is on disk
            self.reload()
            self.data["units"][key] = {"shards": [r if isinstance(r, dict) else r._asdict() for r in records],
                                       "info": info}
            self.data["next_shard_index"] = max(int(self.data["next_shard_index"]), next_shard_index)
            self.save()

    def reserve_shard_indices(self, count: int) -> int:
        """First of `count` shard indices no other rank will use (distributed runs; renumbered in
        plan order when the run finishes, so the names do not depend on who finished first)."""
        with self._locked():
            self.reload()
            first = int(self.data["next_shard_index"])
            self.data["next_shard_index"] = first + count
            self.save()
            return first

    def reload(self) -> None:
        """Units and the shard counter as on disk (other ranks' commits)."""
        other = Journal.load(self.path.parent)
        if other is not None:
            self.data["units"] = {**self.data["units"], **other.data["units"]}
            self.data["next_shard_index"] = max(int(self.data["next_shard_index"]), int(other.data["next_shard_index"]))

    @contextmanager
    def _locked(self):
        import fcntl

        with open(self.path.with_name(self.path.name + ".lock"), "a") as f:
            fcntl.flock(f, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def forget(self, key: str) -> None:
        self.data["units"].pop(key, None)
        self.save()

    def mark_complete(self) -> None:
        self.data[JOURNAL_COMPLETE] = True
        self.save()

    def save(self) -> None:
        atomic_write_json(self.path, self.data, indent=None)  # rewritten after every unit: keep it compact


# source_fingerprint: an object (SourceFingerprint.to_json), or a digest string in older journals
_FIELDS: dict[str, type | tuple[type, ...]] = {"settings": dict, "source_fingerprint": (dict, str), "units": dict,
                                               "next_shard_index": int, "complete": bool}
_RECORD = {"filename": str, "sha256": str, "size": int}


def _shape_problem(data: object) -> str | None:
    """What makes `data` unusable as a journal (checked on load, so a hand-edited or foreign file is
    one line, not a KeyError deep in resume), or None."""
    if not isinstance(data, dict):
        return f"a JSON {type(data).__name__}, expected an object"
    if data.get("format") != FORMAT:
        return f"format is {data.get('format')!r}, expected {FORMAT!r}"
    for key, kind in _FIELDS.items():
        if key not in data:
            return f"no {key!r}"
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            expected = " or ".join(k.__name__ for k in (kind if isinstance(kind, tuple) else (kind,)))
            return f"{key!r} is a {type(data[key]).__name__}, expected a {expected}"
    for key, unit in data["units"].items():
        shards = unit.get("shards") if isinstance(unit, dict) else None
        if not isinstance(shards, list):
            return f"unit {key!r} has no list of shards"
        for rec in shards:
            if not isinstance(rec, dict) or not all(isinstance(rec.get(k), t) for k, t in _RECORD.items()):
                return f"unit {key!r} has a shard record without filename, sha256 and size"
            if rec["filename"] != Path(rec["filename"]).name:  # shard names only: never a path out of --out
                return f"unit {key!r} names a shard outside the output directory: {rec['filename']!r}"
    return None
