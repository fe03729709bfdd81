"""Several processes on one output (`torchrun --nproc-per-node N -m mobe_stream compress ...`): the
world from torchrun's environment, the process group (gloo on CPUs, nccl on GPUs), and per-unit
claims on the shared output directory.

Work is split by units through the journal: every rank walks the plan in order and takes the first
unit nobody has finished or claimed. A claim is a file created under a lock in
`.mobe-state/claims/`, refreshed by a heartbeat; a claim whose process is gone (same host, pid
not alive) or whose heartbeat is older than CLAIM_STALE_S is taken over, and the unit resumes from
its solver checkpoint. Rank 0 holds the run lock, opens the journal and finishes the run (index,
manifest, config) once every unit is journaled.

With `--expert-parallel` the ranks instead fit each projection together, each owning a run of its
experts (factorize/shard.py); `expert_shard` gives the solver its collectives over the process
group. A collective that fails (a peer died: gloo and nccl raise) becomes a one-line PeerError.
"""

from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PeerError
from ..factorize import ExpertShard, expert_bounds

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

        if cuda:  # one GPU per rank on a node: `cuda` then means this rank's own
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo")


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist

        dist.barrier()


def _collective(fn, *args, **kw) -> None:
    try:
        fn(*args, **kw)
    except RuntimeError as e:  # DistBackendError included: the peer's connection closed, or a timeout
        # gloo: "[.../pair.cc:537] Read error [127.0.0.1]:11178: Connection reset by peer. This is ...":
        # the first sentence without the source location
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        reason = re.sub(r"^\[[^\]]*\]\s*", "", text).split(". ")[0]
        raise PeerError(f"another rank of the distributed run failed ({reason}); progress up to the last "
                        f"checkpoint is saved, rerun with --resume") from None


def expert_shard(world: World, total: int) -> ExpertShard:
    """This rank's contiguous run of `total` experts and its collectives over the process group.
    nccl moves tensors through this rank's GPU; gloo through host memory."""
    import torch.distributed as dist

    wire = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    sizes = [hi - lo for lo, hi in (expert_bounds(total, world.size, r) for r in range(world.size))]

    def all_reduce(t: torch.Tensor) -> None:
        w = t.to(wire)
        _collective(dist.all_reduce, w)
        if w is not t:
            t.copy_(w)

    def broadcast(t: torch.Tensor) -> None:
        w = t.to(wire)
        _collective(dist.broadcast, w, src=0)
        if w is not t:
            t.copy_(w)

    def gather(t: torch.Tensor) -> torch.Tensor:
        # all_gather wants equal sizes: pad every run to the longest, then cut each back
        pad = torch.zeros((max(sizes), *t.shape[1:]), dtype=t.dtype, device=wire)
        pad[:t.shape[0]] = t
        parts = [torch.empty_like(pad) for _ in sizes]
        _collective(dist.all_gather, parts, pad)
        return torch.cat([part[:n] for part, n in zip(parts, sizes, strict=True)]).to(t.device)

    lo, hi = expert_bounds(total, world.size, world.rank)
    return ExpertShard(lo, hi, total, all_reduce, gather, broadcast, main=world.main)


def agree(world: World, flag: bool) -> bool:
    """True on every rank when any rank says True (a stop request, between units)."""
    if world.size == 1:
        return flag
    import torch.distributed as dist

    t = torch.tensor([1.0 if flag else 0.0])
    if dist.get_backend() == "nccl":
        t = t.cuda()
    _collective(dist.all_reduce, t)
    return bool(t.item() > 0)


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
        """True if this process now holds the unit (a stale claim is taken over). Check and take
        happen under one lock on the claims directory: without it a rank could read another's claim
        between its creation and its contents (and take it as stale), or two ranks could both
        replace the same stale claim, and both would do the unit."""
        import fcntl

        path = self._path(key)
        with open(self.dir / ".lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if path.exists():
                if not self.stale(path):
                    return False
                path.unlink()
            with open(path, "w") as f:
                json.dump({"host": self.host, "pid": self.pid, "rank": self.world.rank, "time": time.time()}, f)
        self._held.add(path)
        return True

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
