"""Progress and event reporting for long jobs: rich bars with ETA, JSON-lines log, or silence.

The pipeline only calls `Reporter.event(kind, **fields)`; sinks decide how to show it. This keeps
the pipeline free of UI code and makes every event loggable with `--log-json`.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from typing import IO, Any

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TaskID, TextColumn
from rich.table import Table

from ..errors import ConfigError, say


class Reporter:
    """Fan-out of events to sinks. `tags` go into every event (under torchrun: the rank). Thread
    safe: rank 0 also re-emits the other ranks' events from a relay thread (dist.shared_progress)."""

    def __init__(self, sinks: list[Sink] | None = None, tags: dict[str, Any] | None = None):
        self.sinks = sinks or []
        self.tags = dict(tags or {})
        self._lock = threading.RLock()  # re-entrant: a signal handler may report while a sink runs

    def event(self, kind: str, /, **fields: Any) -> None:
        fields = {**self.tags, **fields}
        with self._lock:
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


class WorkTracker:
    """Cost-weighted progress of a run, from its events: the plan's expected seconds per unit
    (`unit_seconds`), then unit_start / solver / copy / unit_done. Several units may run at once
    (torchrun ranks: rank 0 sees the others' events too). The ETA is the work still to do at the
    rate this run has done work, so a run of cheap copies never promises a factorized projection
    in seconds, and a resumed run does not count work done before it."""

    def __init__(self) -> None:
        self.costs: dict[str, float] = {}
        self.total = 0.0
        self.finished = 0.0  # seconds of work of finished units
        self.units_total = self.units_done = 0
        self.running: dict[str, list] = {}  # unit -> [done, total, rel_error, rank], in start order
        self.t0 = time.monotonic()
        self.base: float | None = None  # fraction done when this process started working

    def key_of(self, fields: dict) -> str | None:
        """The running unit an event is about (its `unit`, else the last one started)."""
        key = fields.get("unit") or next(reversed(self.running), None)
        return key if key in self.running else None

    def _unit(self, fields: dict) -> list | None:
        key = self.key_of(fields)
        return None if key is None else self.running[key]

    def event(self, kind: str, fields: dict) -> None:
        if kind == "plan":
            self.costs = {k: max(float(v), 1e-6) for k, v in (fields.get("unit_seconds") or {}).items()}
            self.total = sum(self.costs.values())
            self.units_total, self.units_done = fields["total_units"], fields["done_units"]
        elif kind == "unit_start":
            total = max(1, fields.get("steps") or fields.get("tensors") or 1)
            self.running[fields["unit"]] = [fields.get("start_step", 0) or 0, total, None, fields.get("rank")]
        elif kind in ("solver", "copy") and (u := self._unit(fields)) is not None:
            u[0] = fields["step"] if kind == "solver" else fields["done"]
            if kind == "solver":
                u[2] = fields.get("rel_error")
        elif kind == "unit_done":
            self.finished += self.costs.get(fields["unit"], 0.0)
            self.units_done += 1
            self.running.pop(fields["unit"], None)
        if self.base is None and kind == "unit_start":
            self.base, self.t0 = self.fraction(), time.monotonic()

    def fraction(self) -> float:
        if self.total <= 0:
            return self.units_done / max(1, self.units_total)
        current = sum(self.costs.get(k, 0.0) * min(1.0, d / t) for k, (d, t, _, _) in self.running.items())
        return min(1.0, (self.finished + current) / self.total)

    def eta(self) -> str:
        base = self.base or 0.0
        done = self.fraction() - base
        elapsed = time.monotonic() - self.t0
        if done <= 1e-9 or elapsed < 1:
            return "ETA -"
        return "ETA " + _clock(elapsed / done * (1 - self.fraction()))

    def status(self) -> str:
        line = f"units {self.units_done}/{self.units_total} ({100 * self.fraction():.0f}%)"
        for key, (d, t, rel, rank) in self.running.items():
            line += f", {'' if rank is None else f'rank {rank}: '}{key} {d}/{t}"
            if rel is not None:
                line += f" rel.err {rel:.4f}"
        return line + f", {self.eta()}"


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class RichSink(Sink):
    """Two bars on a terminal: the whole run (weighted by each unit's expected cost, with its ETA) and
    the current unit (steps or tensors, the relative error of the best iterate). Columns fit 60
    characters; log lines are printed above the bars without rich's automatic highlighting."""

    def __init__(self, console: Console | None = None):
        self.console = console or Console(stderr=True, highlight=False)
        self.progress = Progress(
            TextColumn("{task.description}"), BarColumn(bar_width=12), TextColumn("{task.fields[info]}"),
            console=self.console, transient=True,
        )
        self.work = WorkTracker()
        self.overall: TaskID | None = None
        self.tasks: dict[str, TaskID] = {}  # one bar per running unit (several under torchrun)
        self.started = False

    def _start(self) -> None:
        if not self.started:
            self.progress.start()
            self.started = True

    def _refresh_overall(self) -> None:
        if self.overall is not None:
            w = self.work
            self.progress.update(self.overall, completed=1000 * w.fraction(),
                                 description=f"units {w.units_done}/{w.units_total}",
                                 info=f"{100 * w.fraction():.0f}% {w.eta()}")

    def _running(self, fields: dict) -> tuple[TaskID, int] | None:
        """The bar and step total of the unit a solver/copy event is about (its `unit`, else the last)."""
        key = self.work.key_of(fields)
        if key is None or key not in self.tasks:
            return None
        return self.tasks[key], self.work.running[key][1]

    def event(self, kind: str, fields: dict) -> None:
        self.work.event(kind, fields)
        if kind == "plan":
            self._start()
            self.overall = self.progress.add_task("units", total=1000, info="")
        elif kind == "unit_start":
            self._start()
            done, total, _, rank = self.work.running[fields["unit"]]
            label = fields["unit"][-24:] if rank is None else f"r{rank} {fields['unit'][-20:]}"
            self.tasks[fields["unit"]] = self.progress.add_task(label, total=total, completed=done, info="")
        elif kind == "solver" and (bar := self._running(fields)) is not None:
            rel = fields.get("rel_error")
            info = f"{fields['step']}/{bar[1]}" + ("" if rel is None else f" rel.err {rel:.4f}")
            self.progress.update(bar[0], completed=fields["step"], info=info)
        elif kind == "copy" and (bar := self._running(fields)) is not None:
            self.progress.update(bar[0], completed=fields["done"], info=f"{fields['done']}/{bar[1]}")
        elif kind == "unit_done":
            task = self.tasks.pop(fields["unit"], None)
            if task is not None:
                self.progress.remove_task(task)
            if fields.get("rel_error") is not None:
                who = "" if fields.get("rank") is None else f"rank {fields['rank']}: "
                self.progress.console.print(f"  {who}{fields['unit']}: rel.err {fields['rel_error']:.4f} in "
                                            f"{fields['seconds']:.1f}s")
        elif kind in ("warning", "message", "checkpoint", "resume", "estimate"):
            style = "yellow" if kind == "warning" else "dim"
            self.progress.console.print(f"[{style}]{escape(fields.get('text', ''))}[/{style}]")
        elif kind == "summary":
            self._stop()
            self.console.print(summary_table(fields))
        self._refresh_overall()

    def _stop(self) -> None:
        if self.started:
            self.progress.stop()
            self.started = False

    def close(self) -> None:
        self._stop()


HEARTBEAT_S = 30.0  # seconds between status lines when stderr is not a terminal


class HeartbeatSink(Sink):
    """When stderr is not a terminal (piped, logged, CI): log lines as they come, a finished unit's
    result, and one status line every `every` seconds, so a long run never looks hung."""

    def __init__(self, stream: IO[str] = sys.stderr, every: float = HEARTBEAT_S):
        self.stream, self.every = stream, every
        self.work = WorkTracker()
        self.last = time.monotonic()

    def _print(self, text: str) -> None:
        say(text, self.stream)

    def event(self, kind: str, fields: dict) -> None:
        self.work.event(kind, fields)
        if kind in ("warning", "message", "resume", "estimate"):
            self._print(("warning: " if kind == "warning" else "") + str(fields.get("text", "")))
        elif kind == "unit_done":
            rel = fields.get("rel_error")
            who = "" if fields.get("rank") is None else f"rank {fields['rank']}: "
            self._print(f"{who}{fields['unit']} done in {fields['seconds']:.1f}s"
                        + ("" if rel is None else f", rel.err {rel:.4f}") + f"; {self.work.status()}")
            self.last = time.monotonic()
        elif kind == "summary" and "expert_reduction" in fields:
            self._print(f"done: expert params -{100 * fields['expert_reduction']:.1f}%, "
                        f"model params -{100 * fields['total_reduction']:.1f}%")
        if time.monotonic() - self.last >= self.every:
            self._print(self.work.status())
            self.last = time.monotonic()


class PlainSink(Sink):
    """Warnings and the summary only (--quiet still prints problems)."""

    def __init__(self, stream: IO[str] = sys.stderr, summary: bool = False):
        self.stream = stream
        self.summary = summary

    def event(self, kind: str, fields: dict) -> None:
        if kind == "warning":
            say(f"warning: {fields.get('text')}", self.stream)


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
