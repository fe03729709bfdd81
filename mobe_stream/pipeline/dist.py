"""Several processes on one output (`torchrun --nproc-per-node N -m mobe_stream compress ...`): the
world from torchrun's environment, the process group (gloo on CPUs, nccl on GPUs), and per-unit
claims on the shared output directory.

Work is split by units through the journal: every rank walks the plan in order and takes the first
unit nobody has finished or claimed. A claim is a file created with O_EXCL under
`.mobe-state/claims/`, refreshed by a heartbeat; a claim whose process is gone (same host, pid
not alive) or whose heartbeat is older than CLAIM_STALE_S is taken over, and the unit resumes from
its solver checkpoint. Rank 0 holds the run lock, opens the journal and finishes the run (index,
manifest, config) once every unit is journaled.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

CLAIM_DIR = "claims"
CLAIM_STALE_S = 120.0
HEARTBEAT_S = 20.0


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> World:
    """torchrun's RANK / WORLD_SIZE (one process when absent)."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    return World(int(os.environ.get("RANK", "0")), size) if size > 1 else World()


def init(world: World, cuda: bool) -> None:
    if world.size > 1:
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class Claims:
    """Per-unit claim files of one run in `state_dir/claims`."""

    def __init__(self, state_dir: Path, world: World):
        self.dir = state_dir / CLAIM_DIR
        self.dir.mkdir(parents=True, exist_ok=True)
        self.world = world
        self.host, self.pid = socket.gethostname(), os.getpid()
        self._held: set[Path] = set()
        self._stop = threading.Event()
        self._beat = threading.Thread(target=self._heartbeat, daemon=True, name="mobe-claims")
        self._beat.start()

    def _path(self, key: str) -> Path:
        return self.dir / f"{key}.claim"

    def stale(self, path: Path) -> bool:
        try:
            info = json.loads(path.read_text())
            age = time.time() - path.stat().st_mtime
        except (OSError, ValueError):
            return True  # half-written or gone: nobody holds it
        if info.get("host") == self.host and not _alive(int(info.get("pid", -1))):
            return True
        return age > CLAIM_STALE_S

    def try_claim(self, key: str) -> bool:
        """True if this process now holds the unit (a stale claim is taken over)."""
        path = self._path(key)
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                if not self.stale(path):
                    return False
                path.unlink(missing_ok=True)  # a racing taker may win the next O_EXCL: then we lose
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"host": self.host, "pid": self.pid, "rank": self.world.rank, "time": time.time()}, f)
            self._held.add(path)
            return True
        return False

    def release(self, key: str) -> None:
        path = self._path(key)
        self._held.discard(path)
        path.unlink(missing_ok=True)

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for path in list(self._held):
                try:
                    os.utime(path)
                except OSError:
                    pass

    def close(self) -> None:
        self._stop.set()
