"""Progress that tells the truth: cost-weighted ETA, 60-column bars, heartbeat lines when piped."""

from __future__ import annotations

import io
import re

from rich.console import Console

from mobe_stream.pipeline.events import HeartbeatSink, RichSink, WorkTracker

PLAN = {"total_units": 3, "done_units": 0, "unit_seconds": {"layer.0.copy": 1.0, "layer.1.gate_proj": 98.0,
                                                             "layer.1.copy": 1.0}}


def _run(sink) -> None:
    sink.event("plan", dict(PLAN))
    sink.event("unit_start", {"unit": "layer.0.copy", "kind": "copy", "tensors": 10})
    sink.event("copy", {"unit": "layer.0.copy", "done": 10})
    sink.event("unit_done", {"unit": "layer.0.copy", "kind": "copy", "seconds": 0.1})
    sink.event("unit_start", {"unit": "layer.1.gate_proj", "kind": "factorize", "steps": 1000, "start_step": 0})
    sink.event("warning", {"text": "a [bold]warning[/bold] with brackets: [1, 2]"})
    sink.event("solver", {"unit": "layer.1.gate_proj", "step": 500, "loss": 0.04, "best_loss": 0.04, "rel_error": 0.2})


def test_progress_is_weighted_by_the_cost_of_each_unit():
    w = WorkTracker()
    for kind, fields in [("plan", dict(PLAN)), ("unit_start", {"unit": "layer.0.copy", "tensors": 4}),
                         ("unit_done", {"unit": "layer.0.copy"})]:
        w.event(kind, fields)
    assert w.fraction() == 0.01  # one unit of three, but a cheap one
    w.event("unit_start", {"unit": "layer.1.gate_proj", "steps": 1000, "start_step": 250})
    w.event("solver", {"step": 500, "rel_error": 0.2})
    assert abs(w.fraction() - 0.50) < 1e-9 and "rel.err 0.2000" in w.status()


def test_bars_fit_60_columns_and_log_lines_are_not_rich_markup():
    buf = io.StringIO()
    sink = RichSink(Console(file=buf, width=60, force_terminal=True, highlight=False))
    _run(sink)
    sink.progress.refresh()
    sink.close()
    text = re.sub(r"\x1b\[[0-9;?]*[a-zA-Z]", "", buf.getvalue())
    lines = [ln for ln in re.split(r"[\r\n]", text) if ln.strip()]
    assert lines and max(len(ln) for ln in lines) <= 60, lines
    assert "a [bold]warning[/bold] with brackets: [1, 2]" in text  # printed as written


def test_piped_output_gets_plain_lines_and_a_heartbeat():
    out = io.StringIO()
    sink = HeartbeatSink(out, every=0.0)
    _run(sink)
    text = out.getvalue()
    assert "\x1b" not in text and "warning: a [bold]warning" in text
    assert "layer.0.copy done" in text and "units 1/3 (1%)" in text
    assert "layer.1.gate_proj 500/1000 rel.err 0.2000" in text


def test_demo_interrupts_and_resumes_visibly_even_with_few_steps():
    from .helpers import run_cli

    proc = run_cli("demo", "--steps", "4", "--family", "qwen3_moe", check=True, timeout=600)
    err = proc.stderr
    assert "interrupted as planned" in err and "resuming" in err, err
    assert err.index("interrupted as planned") < err.index("compress --resume") < err.index("resuming")


def test_json_and_log_json_end_with_one_status_on_every_exit_path(tmp_path):
    import json

    from mobe_stream.synth import make_tiny_moe

    from .helpers import run_cli

    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    args = ["compress", str(src), "--out", str(out), "--num-bases", "4", "--rank", "16", "--steps", "2"]
    proc = run_cli(*args, "--json", "--log-json", str(log), check=True)
    doc = json.loads(proc.stdout)
    assert doc["status"] == "ok" and doc["output"] == str(out.resolve()) and 0 < doc["expert_reduction"] < 1
    events = [json.loads(line) for line in log.read_text().splitlines()]
    assert events[-1]["event"] == "status" and events[-1]["status"] == "ok"
    assert {"plan", "unit_start", "unit_done", "summary"} <= {e["event"] for e in events}
    proc = run_cli(*args[:-1], "3", "--resume", "--json", "--log-json", str(log))
    doc = json.loads(proc.stdout)
    assert proc.returncode == 2 and doc["status"] == "error" and doc["exit_code"] == 2 and "steps" in doc["message"]
    last = json.loads(log.read_text().splitlines()[-1])
    assert last["event"] == "status" and last["status"] == "error" and last["exit_code"] == 2
    verdict = json.loads(run_cli("verify", str(out), "--json", check=True).stdout)
    assert verdict == {"path": str(out), "ok": True, "problems": []}
