"""Is the source checkpoint the one its manifest.json recorded? Checked before its tensors are used.

`export` reads every tensor of a MoBE checkpoint and writes a fresh, valid manifest: without this
check a corrupt source shard would come out the other side with new, matching checksums.

Cost: each shard is hashed with one sequential read before export reads its tensors (the page cache
usually serves the second read). At 1-2 GB/s per core that is 6-12 minutes for a 700 GB compressed
Kimi-K2, on top of an export that reads all of it anyway. A resumed export hashes only the shards
its remaining units read: those of finished units were hashed before use by the run that wrote them,
and the journal's source fingerprint refuses a replaced source.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from ..checkpoint.reader import CheckpointReader
from ..checkpoint.writer import MANIFEST_NAME, read_manifest, shard_problem
from ..errors import CheckpointError

_CORRUPT = "the source is corrupt (run mobe-stream verify)"


class SourceShards:
    """Sizes of every shard are checked on construction (cheap: refuse before any output exists);
    `check(shards)` hashes each shard the first time it is named."""

    def __init__(self, reader: CheckpointReader, warn: Callable[[str], None]):
        self.model_dir = reader.model_dir
        self.records = read_manifest(self.model_dir)
        self.hashed: set[str] = set()
        if self.records is None:
            warn(f"{self.model_dir / MANIFEST_NAME}: missing (not written by mobe-stream); the source's shard "
                 f"checksums are not checked")
            return
        for shard in reader.shards:
            if shard not in self.records:
                raise CheckpointError(f"not listed in {MANIFEST_NAME}; {_CORRUPT}", self.model_dir / shard)
            self._refuse(shard, full=False)

    def check(self, shards: Iterable[str]) -> None:
        if self.records is None:
            return
        for shard in shards:
            if shard not in self.hashed:
                self._refuse(shard, full=True)
                self.hashed.add(shard)

    def _refuse(self, shard: str, full: bool) -> None:
        assert self.records is not None
        problem = shard_problem(self.model_dir / shard, self.records[shard], full)
        if problem:
            raise CheckpointError(f"{problem}; {_CORRUPT}", self.model_dir / shard)
