"""`mobe-stream demo`: the whole job on a tiny built-in model, in under a minute on a laptop CPU.

Makes a tiny structured MoE, starts compressing it, interrupts itself with a real SIGINT after the
first solver checkpoint (exactly what Ctrl-C does), resumes with --resume, prints the report and
generates a few tokens from the compressed model.
"""

from __future__ import annotations

import os
import shutil
import signal
import tempfile
from pathlib import Path

from rich.console import Console

from . import defaults
from .pipeline.compress import Interrupted, compress
from .pipeline.events import Reporter, RichSink, Sink
from .pipeline.options import CompressOptions


class _InterruptOnce(Sink):
    """Sends this process SIGINT midway through the second factorized projection, as a user
    pressing Ctrl-C would: the solver checkpoints and the run stops, resumable."""

    def __init__(self, steps: int):
        self.fired = False
        self.units = 0
        self.at = min(50, max(1, steps // 2))  # midway through the unit, whatever --steps is

    def event(self, kind: str, fields: dict) -> None:
        if kind == "unit_start" and fields.get("kind") == "factorize":
            self.units += 1
        if kind == "solver" and self.units == 2 and fields["step"] >= self.at and not self.fired:
            self.fired = True
            os.kill(os.getpid(), signal.SIGINT)


def run_demo(workdir: Path | None = None, family: str = "deepseek_v3", steps: int = 300, solver: str = defaults.SOLVER) -> dict:
    from .synth import make_tiny_moe

    console = Console(stderr=True, highlight=False)
    tmp = None
    if workdir is None:
        tmp = tempfile.mkdtemp(prefix="mobe-demo-")
        workdir = Path(tmp)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        src, out = workdir / f"tiny-{family}", workdir / f"tiny-{family}-MoBE"
        if src.exists():
            shutil.rmtree(src)
        console.rule(f"1. tiny structured {family} checkpoint")
        make_tiny_moe(src, family=family, structured=True, seed=0, fp8=family != "qwen3_moe")
        console.print(f"wrote {src}")
        opts = CompressOptions(reduction=0.25, steps=steps, overwrite=True, solver=solver)
        console.rule("2. compress (a real SIGINT will interrupt it midway)")
        reporter = Reporter([RichSink(console), _InterruptOnce(steps)])
        try:
            compress(src, out, opts, reporter)
        except Interrupted as e:
            reporter.close()  # the bars go before the message, none left behind
            console.print(f"[yellow]interrupted as planned:[/yellow] {e}")
        finally:
            reporter.close()
        console.rule("3. compress --resume")
        opts.resume, opts.overwrite = True, False
        reporter = Reporter([RichSink(console)])
        try:
            summary = compress(src, out, opts, reporter)
        finally:
            reporter.close()
        _generate(out, console)
        return summary
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


def _generate(model_dir: Path, console: Console) -> None:
    import sys

    from .runtime.generate import generate
    from .runtime.model import load_model
    from .runtime.tokenizer import Tokenizer

    console.rule("4. generate from the compressed model (random tiny weights: expect gibberish)")
    tok = Tokenizer(model_dir)
    model = load_model(model_dir, dtype="fp32", device_map="auto")
    try:
        r = generate(model, tok, "The experts share", max_new_tokens=16, stream=sys.stdout)
    finally:
        model.close()
    console.print(f"{r.new_tokens} tokens, decode {r.tokens_per_s:.1f} tok/s, peak RSS {r.peak_rss_bytes / 2**20:.0f} MiB")
