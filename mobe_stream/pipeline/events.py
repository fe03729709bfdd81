"""Progress and event reporting for long jobs: rich bars with ETA, JSON-lines log, or silence.

The pipeline only calls `Reporter.event(kind, **fields)`; sinks decide how to show it. This keeps
the pipeline free of UI code and makes every event loggable with `--log-json`.
"""

from __future__ import annotations

import json
import sys
import time
from typing import IO, Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from ..errors import ConfigError


class Reporter:
    """Fan-out of events to sinks."""

    def __init__(self, sinks: list[Sink] | None = None):
        self.sinks = sinks or []

    def event(self, kind: str, /, **fields: Any) -> None:
        for s in self.sinks:
            s.event(kind, fields)

    def close(self) -> None:
        for s in self.sinks:
            s.close()


class Sink:
    def event(self, kind: str, fields: dict) -> None: ...

    def close(self) -> None: ...


class JsonLinesSink(Sink):
    def __init__(self, path: str):
        """Opened (for appending) before any work starts: a bad --log-json is a one-line error, not
        a traceback after hours of work."""
        try:
            self.f: IO[str] = open(path, "a", buffering=1)
        except OSError as e:
            raise ConfigError(f"cannot open --log-json for appending ({e.strerror or e})", path) from None

    def event(self, kind: str, fields: dict) -> None:
        self.f.write(json.dumps({"time": round(time.time(), 3), "event": kind, **fields}, default=str) + "\n")

    def close(self) -> None:
        self.f.close()


class RichSink(Sink):
    """Overall bar over units (ETA from measured speed) plus a per-unit bar with step/loss/error."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=self.console, transient=False,
        )
        self.overall: TaskID | None = None
        self.current: TaskID | None = None
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    def event(self, kind: str, fields: dict) -> None:
        if kind == "plan":
            self._start()
            self.overall = self.progress.add_task("units", total=fields["total_units"], completed=fields["done_units"], info="")
        elif kind == "unit_start":
            self._start()
            total = fields.get("steps") or fields.get("tensors") or 1
            done = fields.get("start_step", 0)
            self.current = self.progress.add_task(fields["unit"], total=total, completed=done, info="")
        elif kind == "solver" and self.current is not None:
            info = f"loss {fields['loss']:.4g}  best {fields['best_loss']:.4g}"
            if fields.get("rel_error") is not None:
                info += f"  rel.err {fields['rel_error']:.4f}"
            self.progress.update(self.current, completed=fields["step"], info=info)
        elif kind == "copy" and self.current is not None:
            self.progress.update(self.current, completed=fields["done"])
        elif kind == "unit_done":
            if self.current is not None:
                self.progress.remove_task(self.current)
                self.current = None
            if self.overall is not None:
                self.progress.advance(self.overall)
            if fields.get("rel_error") is not None:
                self.progress.console.print(f"  {fields['unit']}: rel.err {fields['rel_error']:.4f} in {fields['seconds']:.1f}s")
        elif kind in ("warning", "message", "checkpoint", "resume", "estimate"):
            style = "yellow" if kind == "warning" else "dim"
            self.progress.console.print(f"[{style}]{fields.get('text', '')}[/{style}]")
        elif kind == "summary":
            self._stop()
            self.console.print(summary_table(fields))

    def _stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False

    def close(self) -> None:
        self._stop()


class PlainSink(Sink):
    """Warnings and the summary only (--quiet still prints problems)."""

    def __init__(self, stream: IO[str] = sys.stderr, summary: bool = False):
        self.stream = stream
        self.summary = summary

    def event(self, kind: str, fields: dict) -> None:
        if kind == "warning":
            print(f"warning: {fields.get('text')}", file=self.stream)


def summary_table(s: dict) -> Table:
    t = Table(title=f"MoBE compression of {s['source']}", show_lines=False)
    for col in ("layer", "gate rel.err", "up rel.err", "time (s)", "params before", "params after"):
        t.add_column(col, justify="right")
    for row in s["layers"]:
        t.add_row(str(row["layer"]), _fmt(row.get("gate_proj")), _fmt(row.get("up_proj")), f"{row['seconds']:.1f}",
                  f"{row['params_before']:,}", f"{row['params_after']:,}")
    t.caption = (f"expert gate/up/down params {s['expert_params_before']:,} -> {s['expert_params_after']:,} "
                 f"({100 * s['expert_reduction']:.1f}% fewer); whole model {s['total_params_before']:,} -> "
                 f"{s['total_params_after']:,} ({100 * s['total_reduction']:.1f}% fewer)")
    return t


def _fmt(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"
