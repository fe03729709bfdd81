"""Ctrl-C and SIGTERM for the long jobs (`compress`, `export`): stop cleanly, resumable, exit 130.

A scheduler's SIGTERM (and a second Ctrl-C) must not leave a lock file behind or kill the process
without a word: the handler turns the signal into an exception or a stop request, so every `with`
block (the output lock first) unwinds normally and the CLI prints one line.

Outside a job's block the CLI's process takes SIGTERM as Ctrl-C (`guard_process`), except while a
failed job unwinds: torchrun SIGTERMs the surviving ranks the moment one dies, typically just after
the survivor's collective has failed and its block has exited, and the survivor must still release
its lock and print why it stops (the default action would kill it silently, exit -15).
"""

from __future__ import annotations

import signal
from contextlib import contextmanager

from .. import faults
from ..errors import MobeError
from .events import Reporter
from .job import StopFlag


class Interrupted(MobeError):
    """Ctrl-C / SIGTERM: progress was saved; the run can be resumed."""

    exit_code = 130


_failing = False  # a job's block exited with an error: the process is unwinding to report it


def _term_outside_jobs(signum, frame) -> None:
    if not _failing:
        raise KeyboardInterrupt


def guard_process() -> None:
    """For the CLI's own process (cli.main): SIGTERM outside a job's block is Ctrl-C (exit 130, one
    line), and is ignored while a failed job unwinds to its error line."""
    signal.signal(signal.SIGTERM, _term_outside_jobs)


@contextmanager
def catch_signals(stop: StopFlag, reporter: Reporter, *, immediate: bool = False):
    """Catch SIGINT and SIGTERM while the block runs.

    immediate=False (compress): the first signal sets `stop` (the solver checkpoints and the job
    stops between steps or units); a second one aborts at once.
    immediate=True (export): the first signal stops the job where it is (Interrupted); that is safe
    because an unfinished unit leaves only temporaries and orphan shards, which resume removes,
    and a unit of export is cheap to redo.
    """

    def handler(signum, frame):
        if immediate:
            if not stop.requested:  # a repeated signal while unwinding is ignored: the lock must be released
                stop.requested = True
                raise KeyboardInterrupt  # not an Exception: no `except Exception` on the way can swallow it
            return
        if stop.requested:
            raise KeyboardInterrupt
        stop.requested = True
        reporter.event("warning", text="interrupt received: checkpointing, then stopping (again to abort)")

    global _failing
    _failing = False  # a new job: whatever failed before was handled by a caller that carried on (demo)
    old = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        for s in old:
            signal.signal(s, handler)
    except ValueError:  # not the main thread
        old = {}
    try:
        yield
        if stop.requested:
            raise Interrupted("interrupted; progress saved, rerun with --resume")
    except KeyboardInterrupt:
        if immediate and stop.requested:
            raise Interrupted("interrupted; rerun with --resume") from None
        raise
    except Exception:
        _failing = True
        raise
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if _failing:
            faults.signal_while_failing()
