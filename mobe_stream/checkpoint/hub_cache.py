"""Models in the local Hugging Face cache: a hub id resolved to its snapshot, and the snapshot's
symlinks accepted where they stay inside the cache's own `models--*` tree. Never a network call.

Layout (huggingface_hub): `<cache>/models--Org--Name/refs/<revision>` holds a commit hash,
`snapshots/<commit>/<file>` are symlinks to `../../blobs/<sha256>`. The cache is `$HF_HUB_CACHE`,
else `$HF_HOME/hub`, else `$XDG_CACHE_HOME/huggingface/hub`, else `~/.cache/huggingface/hub`.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from ..errors import CheckpointError

HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
COMMIT = re.compile(r"^[0-9a-f]{40}$")


def hub_cache_dir() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "huggingface" / "hub"


def containment_root(model_dir: Path) -> Path:
    """The directory every file of a model must resolve inside: the model directory itself, or for
    a cache snapshot (`models--*/snapshots/<commit>`) the `models--*` tree its symlinks point into."""
    d = Path(model_dir).resolve()
    if d.parent.name == "snapshots" and d.parent.parent.name.startswith("models--"):
        return d.parent.parent
    return d


def resolve_model_path(arg: str | Path, revision: str | None = None) -> Path:
    """`arg` as a directory if it is one; else a hub id (`Org/Name`) looked up in the local cache at
    `revision` (a branch or tag name, or a commit; default main). Anything else comes back as given,
    for the reader to refuse with its own message."""
    path = Path(arg).expanduser()
    if path.exists() or not HUB_ID.fullmatch(str(arg)):
        if revision is not None and not path.exists():
            raise CheckpointError(f"--revision {revision} needs a hub id (Org/Name), not a path", path)
        return path
    rev = revision or "main"
    repo = hub_cache_dir() / ("models--" + str(arg).replace("/", "--"))
    hint = f"download it first: huggingface-cli download {arg}" + (f" --revision {rev}" if revision else "")
    if not repo.is_dir():
        raise CheckpointError(f"{arg} is not a directory and not in the local Hugging Face cache; {hint}", repo)
    ref = repo / "refs" / rev
    commit = ref.read_text().strip() if ref.is_file() else rev
    snapshot = repo / "snapshots" / commit
    if not COMMIT.fullmatch(commit) or not snapshot.is_dir():
        raise CheckpointError(f"{arg} has no snapshot for revision {rev!r} in the local cache; {hint}", repo)
    return snapshot
