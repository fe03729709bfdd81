"""What a resumed run must find unchanged in its source, and the words for what changed.

A run killed at hour 10 and resumed must not mix output computed from two different sources. The
check has to stay cheap at 1 TB (Kimi-K2: 62 shards, 1.03 TB), so it combines three parts:

- `digest`: sha256 over every shard's name, size, raw header and three 64 KiB data samples
  (computed by the reader): catches a re-download or a replaced source with the same layout.
- `config_sha256` / `index_sha256`: the full content of config.json and the index (kilobytes).
- `files`: per shard, the stat identity (size, st_mtime_ns, st_ctime_ns, st_ino, st_dev). Any write,
  truncate, `touch` or copy-over changes st_ctime, and no user call can set it back, so an in-place
  edit of bytes the samples never see is caught without reading them.

Decisive are size, mtime, ctime, digest and the two JSON hashes. Inode and device only choose the
words: they change when a network or FUSE filesystem is remounted (e.g. after a reboot) although the
files are the same, so on their own they are accepted. A copy (`cp -a`, rsync, another disk) gets a
new ctime and is refused as "a different file": resume cannot prove its bytes equal the original's
without reading them all. So is a `chmod`/`chown` of a shard (ctime again). The way out is to resume
from the original files, or start over with --overwrite.

Cost per resume at Kimi-K2 scale: 62 stat calls (microseconds each), 62 header reads and 186
samples of 64 KiB (12 MiB), i.e. well under a second even on a network disk. A full sha256 of
1.03 TB at 1-2 GB/s per core (or the disk's rate, if slower) would take 9-17 minutes per resume,
more on a network disk; that is `verify`'s job for the output, not a default for the source.
Side files (tokenizer, generation config) are not fingerprinted: they are copied whole at the end
of every run, so they can never be mixed.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError

_MAX_NAMED = 3  # files named in the one-line message before "and N more"


@dataclass(frozen=True)
class SourceFingerprint:
    digest: str
    config_sha256: str | None = None  # None: journal written before these fields existed
    index_sha256: str | None = None
    files: dict[str, tuple[int, ...]] | None = None  # shard -> (size, mtime_ns, ctime_ns, ino, dev)

    @classmethod
    def take(cls, model_dir: Path, digest: str, config_name: str, index_name: str,
             shards: list[str]) -> SourceFingerprint:
        index = model_dir / index_name
        return cls(digest, _sha256(model_dir / config_name), _sha256(index) if index.is_file() else None,
                   {shard: _identity(model_dir / shard) for shard in sorted(shards)})

    def to_json(self) -> dict:
        return {"digest": self.digest, "config_sha256": self.config_sha256, "index_sha256": self.index_sha256,
                "files": None if self.files is None else {k: list(v) for k, v in self.files.items()}}

    @classmethod
    def from_json(cls, data: str | dict) -> SourceFingerprint:
        """A journal's record; a plain string is an older journal's digest (content samples only)."""
        if isinstance(data, str):
            return cls(data)
        try:
            files = data["files"]
            return cls(str(data["digest"]), data["config_sha256"], data["index_sha256"],
                       None if files is None else {k: tuple(v) for k, v in files.items()})
        except (AttributeError, KeyError, TypeError):
            raise ValueError(f"unreadable source fingerprint {str(data)[:80]!r}") from None

    def changes_since(self, old: SourceFingerprint) -> list[str]:
        """Short phrases naming what differs from `old` (empty: the same source, as far as we can tell)."""
        changes = []
        if old.files is not None and self.files is not None:  # else: an older journal, digest only
            if old.config_sha256 != self.config_sha256:
                changes.append("config.json content differs")
            if old.index_sha256 != self.index_sha256:
                changes.append("index content differs")
            changes += [f"{name} is missing" for name in old.files if name not in self.files]
            changes += [f"{name} is new" for name in self.files if name not in old.files]
            changes += [f"{name} ({why})" for name in old.files if name in self.files
                        if (why := _file_change(old.files[name], self.files[name]))]
        if not changes and old.digest != self.digest:
            changes.append("shard headers or sampled data differ")
        if len(changes) > _MAX_NAMED:
            changes = changes[:_MAX_NAMED] + [f"and {len(changes) - _MAX_NAMED} more"]
        return changes


def _file_change(old: tuple[int, ...], new: tuple[int, ...]) -> str | None:
    (size0, mtime0, ctime0, ino0, dev0), (size1, mtime1, ctime1, ino1, dev1) = old[:5], new[:5]
    if size0 != size1:
        return f"size was {size0}, now {size1}"
    if mtime0 != mtime1:
        return "modified: its mtime changed"
    if ctime0 != ctime1:
        if (ino0, dev0) != (ino1, dev1):
            return "a different file: replaced, copied or moved to another filesystem"
        return "changed in place: its ctime changed (a write with the mtime put back, chmod or chown)"
    return None


def _identity(path: Path) -> tuple[int, ...]:
    try:
        st = os.stat(path)  # follows symlinks (Hugging Face cache snapshots point into blobs/)
    except OSError as e:
        raise CheckpointError(f"cannot stat ({e.strerror or e})", path) from None
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError as e:
        raise CheckpointError(f"cannot read ({e.strerror or e})", path) from None
