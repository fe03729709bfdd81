"""What every command shares: turning expected failures into one line and an exit code."""

from __future__ import annotations

import contextlib
import errno
import functools
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import typer

from .errors import MobeError, say


def friendly(fn):
    """MobeError -> one line on stderr and its exit code (2, or 130 when interrupted)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except MobeError as e:
            say(f"error: {e}")
            raise typer.Exit(e.exit_code) from None
        except KeyboardInterrupt:
            say("error: aborted")
            raise typer.Exit(130) from None
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                where = f"{e.filename}: " if e.filename else ""
                say(f"error: {where}disk full ({e.strerror}); free space and rerun with --resume")
                raise typer.Exit(2) from None
            raise

    return wrapper


def model_path(arg: Path, revision: str | None) -> Path:
    """A model argument as a directory: itself, or a hub id's snapshot in the local HF cache. An
    output of ours that a run has not finished is refused with what to do (rather than whatever
    file it happens to lack yet)."""
    from .checkpoint.hub_cache import resolve_model_path
    from .verify import incomplete_run

    path = resolve_model_path(str(arg), revision)
    if path.is_dir():
        for problem in incomplete_run(path):
            raise MobeError(problem)
    return path


def run_job(reporter, job, as_json: bool):
    """Run a long job (compress, export) with a final `status` event on every exit path (ok, error,
    interrupted, crash) and, with --json, exactly one JSON object on stdout either way."""
    try:
        result = job()
    except MobeError as e:
        _finish(reporter, as_json, "interrupted" if e.exit_code == 130 else "error", e.exit_code, {"message": str(e)})
        raise
    except KeyboardInterrupt:  # a second Ctrl-C (the first one stops cleanly, as Interrupted above)
        _finish(reporter, as_json, "interrupted", 130, {"message": "aborted"})
        raise
    except BaseException as e:
        _finish(reporter, as_json, "crash", 1, {"message": f"{type(e).__name__}: {e}"})
        raise
    _finish(reporter, as_json, "ok", 0, {"output": result.get("output")}, doc=result)
    return result


def _finish(reporter, as_json: bool, status: str, exit_code: int, event: dict, doc: dict | None = None) -> None:
    """The `status` event (then the reporter is closed) and, with --json, the one stdout object
    (`doc`, the whole result, on success; the event's fields otherwise)."""
    import json

    head = {"status": status, "exit_code": exit_code}
    try:
        reporter.event("status", **head, **event)
    finally:
        reporter.close()
    if as_json:
        print(json.dumps({**head, **(event if doc is None else doc)}, default=str))


@contextlib.contextmanager
def counted_progress(label: str) -> Iterator[Callable[[int, int], None]]:
    """A callback(done, total) drawing a bar on a terminal, or, when stderr is piped or logged, one
    plain line every HEARTBEAT_S seconds and at the end (a bar would be invisible there until done)."""
    from .pipeline.events import HEARTBEAT_S

    if sys.stderr.isatty():
        from rich.console import Console
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn(),
                      console=Console(stderr=True, highlight=False), transient=True) as bar:
            task = bar.add_task(label, total=None)
            yield lambda done, total: bar.update(task, completed=done, total=total)
        return
    last = [time.monotonic()]

    def line(done: int, total: int) -> None:
        now = time.monotonic()
        if now - last[0] >= HEARTBEAT_S or done == total:
            print(f"{label}: {done}/{total}", file=sys.stderr, flush=True)
            last[0] = now

    yield line
