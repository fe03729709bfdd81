"""Whether one directory lies inside another however it is reached: the rule that keeps every write
of ours out of a model directory (compress/export outputs, the runtime's offload folder).

Paths are compared resolved *and* by (device, inode) of every existing ancestor: a bind mount or a
second mount of the same filesystem gives a directory another path but not another inode.
"""

from __future__ import annotations

from pathlib import Path


def _identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _chain(path: Path) -> list[tuple[int, int]]:
    """(device, inode) of `path` and every existing ancestor."""
    ids = []
    for p in (path, *path.parents):
        ident = _identity(p)
        if ident is not None:
            ids.append(ident)
    return ids


def is_inside(path: str | Path, root: str | Path) -> bool:
    """`path` is `root` or lies inside it (resolved paths, or an ancestor of `path` with root's inode)."""
    path, root = Path(path).resolve(), Path(root).resolve()
    if path == root or root in path.parents:
        return True
    root_id = _identity(root)
    return root_id is not None and root_id in _chain(path)
