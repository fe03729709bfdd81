"""The `mobe-stream` command line: thin Typer wrappers over the library."""

from __future__ import annotations

import faulthandler
import json
import sys
from pathlib import Path

import typer

from . import __version__, defaults
from .cli_common import friendly, model_path, run_job
from .cli_runtime import register as register_runtime
from .errors import MobeError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, rich_markup_mode=None,
                  help="Streaming Mixture-of-Basis-Experts compression and offloaded inference for giant MoE models.")


def _reporter(quiet: bool, log_json: Path | None, tags: dict | None = None):
    """--quiet: problems only; a terminal: live bars; piped or logged stderr: plain lines with a heartbeat."""
    from .pipeline.events import HeartbeatSink, JsonLinesSink, PlainSink, Reporter, RichSink, Sink

    sinks: list[Sink] = [PlainSink()] if quiet else [RichSink()] if sys.stderr.isatty() else [HeartbeatSink()]
    if log_json:
        sinks.append(JsonLinesSink(str(log_json)))
    return Reporter(sinks, tags)


@app.command()
@friendly
def compress(
    ctx: typer.Context,
    src: Path = typer.Argument(..., help="Source model directory (safetensors), or a hub id in the local HF cache."),
    revision: str | None = typer.Option(None, help="With a hub id (Org/Name) for the model: the branch, tag or "
                                        "commit of its snapshot in the local Hugging Face cache (default main)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory for the MoBE checkpoint."),
    method: str = typer.Option("mobe", help="mobe, or a baseline at the same parameter budget: svd, molae, delta."),
    num_bases: int | None = typer.Option(None, help="Bases per MoE layer (m), over all groups."),
    rank: int | None = typer.Option(None, help="Rank r of each basis (default: moe_intermediate_size, as in the paper; "
                                    "lowered only when --reduction cannot be met with it)."),
    reduction: float | None = typer.Option(None, help="Target cut of expert parameters, e.g. 0.25 (default when m/r not given)."),
    activation: str = typer.Option("silu", help="silu or tanh."),
    groups: int = typer.Option(1, help="Expert groups, each with its own bases."),
    solver: str = typer.Option(defaults.SOLVER, help="als (variable projection: A in closed form, no per-expert "
                               "optimizer state) or adam (the paper's: A, B and α all by Adam)."),
    init: str = typer.Option(defaults.INIT, help="scaled (the paper's grouped SVD with bases at entry RMS 0.5 and "
                             "own-basis logit 3: measured best), paper (SVD of contiguous expert-id runs, as published), "
                             "clustered (SVD of balanced sets of similar experts), or fitted (paper bases, least-squares A)."),
    steps: int = typer.Option(defaults.STEPS, help="Optimisation steps per projection (one step = pass over all experts)."),
    precision: str = typer.Option(defaults.PRECISION, help="Matmul precision of the solver: auto (bf16 on CUDA, fp32 on "
                                  "CPU and for calibrated fits), fp32, tf32, bf16; fp32 accumulation and fp32 "
                                  "master bases either way."),
    schedule: str = typer.Option(defaults.SCHEDULE, help="Step sizes: decay (bases step relative to their size, lr "
                                 "decays linearly over the last 30% of --steps: measured ~2x fewer steps to the same "
                                 "error) or constant (the paper's: lr at every step)."),
    lr: float = typer.Option(defaults.LR, help="Adam learning rate (the peak one under --schedule decay)."),
    tol: float | None = typer.Option(None, help="Stop a projection early when the loss stops improving by this relative amount."),
    layers: str | None = typer.Option(None, help="MoE layers to compress, e.g. 1-3,7 (default all)."),
    device: str = typer.Option("auto", help="auto, cpu, cuda, cuda:1 ..."),
    seed: int = typer.Option(0),
    dtype: str = typer.Option("auto", help="Storage dtype of the factors: auto (the source experts': FP8 sources get FP8 "
                                           "factors with 128x128 block scales), fp8, bf16, fp16, fp32."),
    max_shard_size: str = typer.Option("5GB", help="Shard size cap (accelerate units: 5GB, 4GiB ...)."),
    max_gpu_memory: str | None = typer.Option(
        None, help="Device memory the solver may use; experts are streamed in batches beyond it."),
    checkpoint_every: float = typer.Option(300.0, help="Seconds between solver checkpoints."),
    calib: Path | None = typer.Option(None, help="Calibration text: fit each expert's error weighted by the inputs it "
                                      "is routed on this text (measured through the original model), not raw weights."),
    calib_tokens: int = typer.Option(defaults.CALIB_TOKENS, help="Tokens of --calib text used."),
    calib_ctx: int = typer.Option(defaults.CALIB_CTX, help="Window length of the calibration forward."),
    calib_rank: int = typer.Option(defaults.CALIB_RANK, help="Rank of each expert's input metric (low rank plus diagonal)."),
    calib_damp: float = typer.Option(defaults.CALIB_DAMP, help="Damping added to the metric, times its mean diagonal."),
    expert_parallel: bool = typer.Option(False, "--expert-parallel", help="Under torchrun: fit each projection with "
                                         "all ranks together, its experts split over them (for fewer projections "
                                         "left than GPUs, or one projection too slow for one GPU)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty --out."),
    force: bool = typer.Option(False, "--force", help="Warn instead of refusing when disk/RAM look too small."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars (warnings and the result line only)."),
    log_json: Path | None = typer.Option(None, help="Append one JSON line per event to this file (docs/JSON.md)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout at the end, on success or not "
                                 "(docs/JSON.md); implies --quiet."),
):
    """Compress an MoE checkpoint with MoBE, one layer at a time, resumably."""
    src = model_path(src, revision)
    from .pipeline.compress import compress as run
    from .pipeline.options import CompressOptions

    opts = CompressOptions(method=method, num_bases=num_bases, rank=rank, reduction=reduction, activation=activation,
                           groups=groups, solver=solver, init=init, steps=steps, precision=precision, schedule=schedule, lr=lr,
                           tol=tol, layers=layers,
                           device=device, seed=seed, dtype=dtype, max_shard_size=max_shard_size, max_gpu_memory=max_gpu_memory,
                           checkpoint_every=checkpoint_every, expert_parallel=expert_parallel, resume=resume,
                           overwrite=overwrite, force=force,
                           calib=None if calib is None else str(calib), calib_tokens=calib_tokens, calib_ctx=calib_ctx,
                           calib_rank=calib_rank, calib_damp=calib_damp, explicit=typed_options(ctx))
    from .pipeline.dist import world_from_env
    from .runtime.calibrate import RUNTIME

    world = world_from_env()
    main_rank = world.main
    # under torchrun rank 0 draws every rank's progress and writes --log-json (dist.shared_progress
    # relays the others' events, tagged with their rank); the other ranks print only problems
    reporter = _reporter(quiet or as_json or not main_rank, log_json if main_rank else None,
                         {"rank": world.rank} if world.size > 1 else None)
    summary = run_job(reporter, lambda: run(src, out, opts, reporter, RUNTIME), as_json and main_rank)
    if not as_json and main_rank:  # always one line saying where the result is (stdout, so scripts can take it)
        print(f"{summary['output']}: expert params -{100 * summary['expert_reduction']:.1f}%, "
              f"model params -{100 * summary['total_reduction']:.1f}%")


@app.command("inspect")
@friendly
def inspect_cmd(
    model: Path = typer.Argument(..., help="Model directory, or a hub id in the local HF cache."),
    revision: str | None = typer.Option(None, help="With a hub id (Org/Name) for the model: the branch, tag or "
                                        "commit of its snapshot in the local Hugging Face cache (default main)."),
    num_bases: int | None = typer.Option(None),
    rank: int | None = typer.Option(None),
    reduction: float | None = typer.Option(None, help="Target cut of expert parameters (default 0.25)."),
    groups: int = typer.Option(1),
    dtype: str = typer.Option("auto", help="Output dtype to project sizes for: auto (the experts' stored dtype), "
                                           "fp8, bf16, fp16, fp32."),
    method: str = typer.Option("mobe", help="mobe, or a baseline at the same budget: svd, molae, delta."),
    estimate: bool = typer.Option(False, "--estimate", help="Project the compress time (per-step FLOPs, device and "
                                  "PCIe bytes, batch, hours) for --gpu."),
    gpu: str = typer.Option("h100", help="What --estimate projects for: h100, h200, a100-80g, l40s, rtx4090, or cpu "
                            "(this machine, measured)."),
    solver: str = typer.Option(defaults.SOLVER, help="Solver to estimate (as compress --solver)."),
    precision: str = typer.Option(defaults.PRECISION, help="Precision to estimate (as compress --precision)."),
    steps: int = typer.Option(defaults.STEPS, help="Steps per projection to estimate."),
    max_gpu_memory: str | None = typer.Option(None, help="Device memory budget to estimate with (default 90% of the GPU's)."),
    calib_tokens: int | None = typer.Option(None, help="Estimate a calibrated run (compress --calib) over this many "
                                            "tokens: forward, input metrics and their bytes."),
    calib_rank: int = typer.Option(defaults.CALIB_RANK, help="Metric rank to estimate (as compress --calib-rank)."),
    calib_ctx: int = typer.Option(defaults.CALIB_CTX, help="Calibration window to estimate (as compress --calib-ctx)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
):
    """Family, layers, dims, dtypes, parameter counts, and what compress will produce and need."""
    model = model_path(model, revision)
    from .model_info import describe

    try:
        info = describe(model, num_bases=num_bases, rank=rank, reduction=reduction, groups=groups, dtype=dtype,
                        method=method, estimate_on=gpu if estimate else None, solver=solver, precision=precision,
                        steps=steps, max_gpu_memory=max_gpu_memory, calib_tokens=calib_tokens, calib_rank=calib_rank,
                        calib_ctx=calib_ctx)
    except ValueError as e:
        raise MobeError(str(e)) from None
    if as_json:
        print(json.dumps(info))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(title=str(model), show_header=False)
    t.add_row("family", f"{info['family']} ({info['layout']} experts)")
    t.add_row("layers", f"{info['num_layers']} ({len(info['moe_layers'])} MoE, {len(info['dense_layers'])} dense)")
    t.add_row("experts per MoE layer", str(info["experts_per_layer"]))
    t.add_row("hidden / moe_intermediate", f"{info['hidden_size']} / {info['moe_intermediate_size']}")
    t.add_row("dtypes (params)", ", ".join(f"{k}: {v:,}" for k, v in info["dtypes"].items()))
    t.add_row("parameters", f"{info['total_params']:,} (experts {info['expert_params']:,})")
    t.add_row("size on disk", _gb(info["size_bytes"]))
    pr = info.get("projection")
    if pr:
        t.add_row("setting", f"{pr['method']}: m={pr['num_bases']} bases, r={pr['rank']}, groups={pr['groups']}, {pr['dtype']}")
        t.add_row("parameters after", f"{pr['params_after']:,} (-{100 * pr['total_reduction']:.1f}% model, "
                                      f"-{100 * pr['expert_reduction']:.1f}% experts)")
        t.add_row("output size", f"{_gb(pr['output_bytes'])} ({100 * pr['source_bytes_ratio']:.1f}% of the source)")
        t.add_row("peak RAM / device per layer",
                  f"{_gb(pr['peak_host_bytes_per_layer'])} / {_gb(pr['peak_device_bytes_per_layer'])}")
    own = info.get("mobe")
    if own:
        t.add_row(f"MoBE ({own['form']} form)", f"{own['method']}: m={own['num_bases']}, r={own['rank']}, groups="
                                                  f"{own['groups']}, {own['activation']}, {own['dtype']}, layers "
                                                  f"{own['layers']}")
        err = own["mean_rel_error"]
        t.add_row("expert params", f"{own['expert_params']:,} of {own['expert_params_original']:,} originally "
                                   f"(-{100 * own['expert_reduction']:.1f}%)" + ("" if err is None else
                                                                                 f", mean rel.err {err:.4f}"))
    est = info.get("estimate")
    if est:
        for row in estimate_rows(est):
            t.add_row(*row)
    Console().print(t)


def typed_options(ctx: typer.Context) -> frozenset[str]:
    """Names of the options given on the command line (or by environment), not left at their default.
    (Compared by name: typer may carry its own copy of click's ParameterSource enum.)"""
    return frozenset(name for name in ctx.params
                     if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP"))


def estimate_rows(est: dict) -> list[tuple[str, str]]:
    """The estimate as (label, value) rows: inspect's table and compress's preflight line share them."""
    where = "resident on the device" if est["resident"] else "streamed through the device"
    return [
        ("estimate for", f"{est['device']}, {est['solver']}, {est['precision']}, {est['steps']} steps x "
                         f"{est['projections']} projections"),
        ("per step", f"{est['flops_per_step'] / 1e12:.2f} TFLOP, {_gb(est['traffic_bytes_per_step'])} memory traffic, "
                     f"{_gb(est['pcie_bytes_per_step'])} over PCIe"),
        ("device / host bytes", f"{_gb(est['device_bytes'])} / {_gb(est['host_bytes'])} (batch {est['batch']} experts, "
                                f"{where})"),
        ("time", f"{est['step_seconds']:.3g} s/step + {est['init_seconds']:.3g} s init per projection: "
                 f"{est['hours']:.2f} h in all"),
        ("rates", est["basis"]),
    ] + ([] if not est.get("calib") else [_calib_row(est["calib"])])


def _calib_row(c: dict) -> tuple[str, str]:
    return ("calibration", f"{c['tokens']:,} tokens, metric rank {c['rank']}: {_gb(c['metric_bytes_per_layer'])} per layer "
                           f"({_gb(c['metric_bytes'])} in all, on disk), {_gb(c['host_bytes'])} of RAM, "
                           f"{c['forward_flops'] / 1e15:.2f} PFLOP forward + {c['metric_flops'] / 1e15:.2f} PFLOP metrics, "
                           f"reads {_gb(c['read_bytes'])}: {c['seconds'] / 3600:.2f} h (in the total)")


def _gb(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e7 else f"{n / 1e6:.3f} MB"


@app.command()
@friendly
def demo(
    workdir: Path | None = typer.Option(None, "--dir", help="Keep the demo files here (default: a temp dir, removed)."),
    family: str = typer.Option("deepseek_v3", help="qwen3_moe, deepseek_v3 or kimi_k2."),
    steps: int = typer.Option(300, help="Solver steps per projection."),
    solver: str = typer.Option(defaults.SOLVER, help="als or adam."),
):
    """Make a tiny structured MoE, compress it (interrupted and resumed once), report, generate."""
    from .demo import run_demo

    run_demo(workdir, family=family, steps=steps, solver=solver)


@app.command()
@friendly
def export(
    src: Path = typer.Argument(..., help="MoBE checkpoint directory."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory (standard MoE layout of the source family)."),
    dtype: str = typer.Option("auto", help="auto (source's), bf16, fp16, fp32, or fp8 (FP8 sources: 128x128 block format)."),
    max_shard_size: str = typer.Option("5GB"),
    resume: bool = typer.Option(False, "--resume"),
    overwrite: bool = typer.Option(False, "--overwrite"),
    quiet: bool = typer.Option(False, "--quiet", "-q"),
    log_json: Path | None = typer.Option(None, help="Append one JSON line per event to this file (docs/JSON.md)."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout at the end; implies --quiet."),
):
    """Rebuild standard expert weights so vLLM/SGLang/transformers can serve the compressed model.

    The experts come back full size: the result is as large as the original (in the chosen dtype)
    and runs at the original's speed; keep the compact MoBE form to keep the savings."""
    from .pipeline.export import ExportOptions
    from .pipeline.export import export as run

    reporter = _reporter(quiet or as_json, log_json)
    summary = run_job(reporter, lambda: run(src, out, ExportOptions(dtype=dtype, max_shard_size=max_shard_size,
                                                                    resume=resume, overwrite=overwrite), reporter),
                      as_json)
    if not as_json:
        print(f"{summary['output']}: exported ({summary['dtype']}, experts full size again)")


@app.command("verify")
@friendly
def verify_cmd(
    model: Path = typer.Argument(..., help="Checkpoint directory (original, MoBE or exported)."),
    quick: bool = typer.Option(False, "--quick", help="Skip sha256 and the NaN/Inf scan."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object on stdout: path, ok, problems."),
):
    """Check shards against the manifest, the index against the headers, shapes against the config.

    Exit 0: fine; 1: problems found (listed on stdout); 2: not a checkpoint directory at all.
    """
    from .verify import verify as check

    problems = check(model, full=not quick, note=lambda text: print(f"note: {text}", file=sys.stderr))
    if as_json:
        print(json.dumps({"path": str(model), "ok": not problems, "problems": problems}))
        if problems:
            raise typer.Exit(1)
        return
    for p in problems:
        print(p)
    if problems:
        print(f"{len(problems)} problem(s) found", file=sys.stderr)
        raise typer.Exit(1)
    print(f"{model}: OK")


@app.command()
def version():
    """Print the version."""
    print(__version__)


def _print_version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit(0)


@app.callback()
def _options(show_version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                               help="Print the version and exit.")) -> None:
    """Streaming Mixture-of-Basis-Experts compression and offloaded inference for giant MoE models."""


register_runtime(app)  # generate, eval


def main() -> None:
    # A source shard cut under a running job can still kill us with SIGBUS (a read through the mmap
    # past the new end, between the reader's size check and the read): say at least where, on
    # stderr. Such a run resumes with --resume like any killed run.
    faulthandler.enable()
    from .pipeline.signals import guard_process

    guard_process()  # SIGTERM: Ctrl-C's exit, and no silent death while a failed job reports why
    app()


if __name__ == "__main__":
    main()
