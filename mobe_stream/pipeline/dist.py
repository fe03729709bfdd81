"""Several processes on one output (`torchrun --nproc-per-node N -m mobe_stream compress ...`): the
world from torchrun's environment, the process group (gloo on CPUs, nccl on GPUs), and per-unit
claims on the shared output directory.

Work is split by units through the journal: every rank walks the plan in order and takes the first
unit nobody has finished or claimed. A claim is a file created under a lock in
`.mobe-state/claims/`, refreshed by a heartbeat; a claim whose process is gone (same host, pid
not alive) or whose heartbeat is older than CLAIM_STALE_S is taken over, and the unit resumes from
its solver checkpoint. Rank 0 holds the run lock, opens the journal and finishes the run (index,
manifest, config) once every unit is journaled.

Progress: every rank's events carry its `rank`; the other ranks log theirs as JSON lines under
`.mobe-state/progress/`, and rank 0 re-emits them (`shared_progress`), so its bars, heartbeat lines
and `--log-json` show every rank's units.

With `--expert-parallel` the ranks instead fit each projection together, each owning a run of its
experts (factorize/shard.py); `expert_shard` gives the solver its collectives over the process
group. A collective that fails (a peer died: gloo and nccl raise) becomes a one-line PeerError.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import PeerError
from ..factorize import ExpertShard, expert_bounds
from .events import JsonLinesSink, Reporter

CLAIM_DIR = "claims"
PROGRESS_DIR = "progress"
# the events of other ranks that rank 0 shows (their plan, estimate and messages repeat its own)
RELAYED = ("unit_start", "solver", "copy", "unit_done", "checkpoint", "resume", "warning")
RELAY_POLL_S = 0.5
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


def shutdown(world: World) -> None:
    """Tear this rank's process group down before the interpreter exits. Left to exit-time
    destructors, gloo's threads can be destroyed still running, and the rank dies of SIGABRT
    ("terminate called without an active exception") after its work is done. Local: no peer waits."""
    if world.size > 1:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


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


def reset_progress(state_dir: Path) -> None:
    """Rank 0, before the ranks start: an empty progress directory (a resumed run's old lines are not news)."""
    d = state_dir / PROGRESS_DIR
    shutil.rmtree(d, ignore_errors=True)
    d.mkdir(parents=True, exist_ok=True)


@contextmanager
def shared_progress(state_dir: Path, world: World, reporter: Reporter) -> Iterator[None]:
    """Under torchrun: the other ranks append their events to `progress/rank-N.jsonl`; rank 0 tails
    those files from a thread and re-emits their unit events into its reporter (tagged with their
    rank), until the block ends (after the barrier every rank reaches when its work is done, so
    nothing is missed). One process: nothing."""
    d = state_dir / PROGRESS_DIR
    if world.size == 1:
        yield
    elif not world.main:
        sink = JsonLinesSink(str(d / f"rank-{world.rank}.jsonl"))
        reporter.sinks.append(sink)
        try:
            yield
        finally:
            reporter.sinks.remove(sink)
            sink.close()
    else:
        relay = _Relay(d, reporter)
        try:
            yield
        finally:
            relay.stop()


class _Relay:
    """Rank 0's reader of the other ranks' progress files: whole new lines, every RELAY_POLL_S."""

    def __init__(self, folder: Path, reporter: Reporter):
        self.folder, self.reporter = folder, reporter
        self.offsets: dict[Path, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mobe-progress")
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(RELAY_POLL_S):
            self.drain()

    def drain(self) -> None:
        for path in sorted(self.folder.glob("rank-*.jsonl")):
            try:
                with open(path, "rb") as f:
                    f.seek(self.offsets.get(path, 0))
                    data = f.read()
            except OSError:
                continue
            whole = data[:data.rfind(b"\n") + 1]  # a line still being written waits for the next poll
            self.offsets[path] = self.offsets.get(path, 0) + len(whole)
            for line in whole.splitlines():
                try:
                    ev = json.loads(line)
                except ValueError:
                    continue
                kind = ev.pop("event", None)
                ev.pop("time", None)
                if kind in RELAYED:
                    self.reporter.event(kind, **ev)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.drain()  # what was written after the last poll
