"""Test-only fault injection, so failure paths that real hardware produces rarely can be tested.

Driven by the environment variable MOBE_STREAM_FAULT, e.g. `enospc_after_bytes=100000` (the shard
writer raises ENOSPC once that many bytes were written in this process) `nan_at_step=5` (a solver
parameter turns NaN once after that step), `nan_from_step=5` (... after every step from then on),
`oom_at_step=5` (a device OOM is raised once), `sigkill_at_step=5` / `sigterm_at_step=5` (the
process sends itself SIGKILL, as a crashed rank, or SIGTERM, as a scheduler's stop, after that solver
step; with `fault_rank=1` only torchrun's rank 1 does) or
`enospc_writing=config.json` (writing any file whose name ends so raises ENOSPC, like a disk
that fills up just then) or `sigterm_while_failing=1` (SIGTERM to itself just after a job's block
has exited with an error, as torchrun sends the surviving ranks when one dies). Unset in normal
use: every hook is then a no-op.
"""

from __future__ import annotations

import errno
import os
import signal

_written = 0
_fired: set[str] = set()


def _get_str(name: str) -> str | None:
    spec = os.environ.get("MOBE_STREAM_FAULT", "")
    for part in spec.split(","):
        key, _, value = part.partition("=")
        if key.strip() == name:
            return value.strip()
    return None


def _get(name: str) -> int | None:
    value = _get_str(name)
    return None if value is None else int(value)


def on_bytes_written(n: int, path: str) -> None:
    """Called by the shard writer after each chunk; raises ENOSPC past the configured budget."""
    global _written
    limit = _get("enospc_after_bytes")
    if limit is None:
        return
    _written += n
    if _written > limit:
        raise OSError(errno.ENOSPC, "No space left on device (injected)", path)


def on_atomic_write(path: os.PathLike) -> None:
    """Called before an atomic file is committed; raises ENOSPC when its name ends with the
    configured `enospc_writing` suffix (e.g. `config.json`, `mobe-journal.json`, `.state.zst`)."""
    suffix = _get_str("enospc_writing")
    if suffix and os.fspath(path).endswith(suffix):
        raise OSError(errno.ENOSPC, "No space left on device (injected)")


def _once(name: str, step: int) -> bool:
    at = _get(name)
    if at is None or step != at or name in _fired:
        return False
    _fired.add(name)
    return True


def nan_at_step(step: int) -> bool:
    """True once, at the configured solver step (the pipeline then poisons a parameter with NaN)."""
    return _once("nan_at_step", step)


def nan_from_step(step: int) -> bool:
    """True at every solver step from the configured one on (a fit that can never recover)."""
    at = _get("nan_from_step")
    return at is not None and step >= at


def oom_at_step(step: int) -> bool:
    """True once, at the configured solver step (the pipeline then raises a device OOM)."""
    return _once("oom_at_step", step)


def signal_at_step(step: int) -> None:
    """Send this process SIGKILL or SIGTERM at the configured solver step (and torchrun rank)."""
    rank = _get("fault_rank")
    if rank is not None and rank != int(os.environ.get("RANK", "0")):
        return
    for name, sig in (("sigkill_at_step", signal.SIGKILL), ("sigterm_at_step", signal.SIGTERM)):
        if _once(name, step):
            os.kill(os.getpid(), sig)


def signal_while_failing() -> None:
    """SIGTERM to this process as a failed job unwinds (`sigterm_while_failing`)."""
    if _once("sigterm_while_failing", 1):
        os.kill(os.getpid(), signal.SIGTERM)
