"""`generate` and `eval` commands; cli.py calls register(app)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from .cli_common import counted_progress, friendly, model_path
from .dtypes import AUTO, dtype_key, dtype_name

if TYPE_CHECKING:
    from .runtime.tokenizer import Tokenizer


def _load(model: Path, tok: Tokenizer, dtype: str, device_map: str, max_memory: str | None,
          offload_folder: Path | None, mobe_cache: str, print_map: bool, expert_cache: str | None = None):
    """Load weights; the caller builds `tok` first so that a bad tokenizer or chat template fails before."""
    from .runtime.device_map import format_plan
    from .runtime.model import load_model

    show = (lambda plan, sizes: print(format_plan(plan, sizes), file=sys.stderr, flush=True)) if print_map else None
    m = load_model(model, dtype=dtype, device_map=None if device_map == "none" else device_map,
                   max_memory=max_memory, offload_folder=offload_folder, mobe_cache=mobe_cache, on_plan=show,
                   expert_cache=expert_cache)
    tok.eos_ids |= set(m.cfg.eos_token_ids)
    return m


def _dry_run(model: Path, dtype: str, device_map: str, max_memory: str | None,
             expert_cache: str | None = None) -> None:
    """Plan from the shard headers for the devices max_memory names (present here or not), print the
    plan on stdout, read no weight."""
    from .checkpoint.reader import CheckpointReader
    from .runtime.config import parse_config
    from .runtime.device_map import format_plan
    from .runtime.model import plan_model, resolve_dtype

    with CheckpointReader(model) as reader:
        cfg = parse_config(reader.config, reader.config_path)
        plan, sizes = plan_model(reader, cfg, resolve_dtype(dtype, reader.config, reader.config_path),
                                 None if device_map == "none" else device_map, max_memory, dry_run=True,
                                 expert_cache=expert_cache)
    print(format_plan(plan, sizes))


DEVICE_MAP_HELP = ("auto, balanced, balanced_low_0, sequential (planned with --max-memory); one device for everything: "
                   "cpu, cuda, cuda:N or N; a JSON file {module: device} (transformers' names: model.embed_tokens, "
                   "model.layers.N, model.norm, lm_head, or embed, layers.N, norm, lm_head; a prefix such as model "
                   "covers what is under it; devices: N, cuda:N, cpu, disk); experts: everything but the routed "
                   "experts on the compute device, experts on cpu/disk, fetched per token through --expert-cache.")
EXPERT_CACHE_HELP = ("With --device-map experts: bytes of hot routed experts kept on the compute device (LRU), "
                     "e.g. 8GiB; default half the device room left.")
MOBE_CACHE_HELP = ("MoBE checkpoints: bytes of mixed bases kept between forwards (LRU over all layers), e.g. 2GiB; "
                   "auto: all of them if that is at most a quarter of the free memory, else a quarter; 0: none.")
MAX_MEMORY_HELP = ('accelerate form, e.g. "0=20GiB,cpu=64GiB,disk", a JSON object {"0": "20GiB", "cpu": "64GiB", '
                   '"disk": null} (ints are bytes) or a .json file of one; a GPU named here must exist (unless '
                   '--dry-run). What the devices named cannot hold goes to disk, with a warning unless disk is named.')
OFFLOAD_HELP = ("Where disk-offloaded tensors stored in another dtype than --dtype (a bf16 checkpoint run in fp32) "
                "are kept cast, as safetensors + index.json, written once and reused by later runs with the same "
                "checkpoint and dtype (anything else rewrites them, with a warning). Other disk tensors, FP8 ones "
                "included, are read from the checkpoint's own shards (mmap); without this option, casts happen on "
                "every fetch. Must not lie inside the model directory.")
DTYPE_HELP = ("Compute dtype: auto (the checkpoint's own: config.json's dtype/torch_dtype; FP8 checkpoints compute in "
              "bfloat16; none given: bfloat16), bf16/bfloat16, fp16/float16/half, fp32/float32/float.")
DRY_RUN_HELP = ("Plan only: print the device map (as --print-device-map) for the devices --max-memory names, even if "
                "this machine lacks them, read no weight, exit 0.")


def _mib(b: int) -> str:
    return f"{b / 2**20:.1f} MiB"


def register(app: typer.Typer) -> None:
    @app.command()
    @friendly
    def generate(
        model: Path = typer.Argument(..., help="Model directory (original or MoBE checkpoint), or a hub id in the "
                                     "local HF cache."),
        revision: str | None = typer.Option(None, help="With a hub id (Org/Name) for the model: the branch, tag or "
                                            "commit of its snapshot in the local Hugging Face cache (default main)."),
        prompt: str = typer.Option(..., "--prompt", "-p", help="Prompt text; - reads it from stdin."),
        chat: bool = typer.Option(False, "--chat", help="Wrap the prompt as one user turn of the model's chat template."),
        max_new_tokens: int = typer.Option(32, help="Stop after this many new tokens (or at EOS)."),
        temperature: float = typer.Option(0.0, help="0 = greedy."),
        top_k: int | None = typer.Option(None, help="Sample only from the k most likely tokens."),
        top_p: float | None = typer.Option(None, help="Nucleus sampling mass."),
        seed: int | None = typer.Option(None, help="Sampling seed."),
        device_map: str = typer.Option("auto", help=DEVICE_MAP_HELP),
        max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
        offload_folder: Path | None = typer.Option(None, help=OFFLOAD_HELP),
        print_device_map: bool = typer.Option(False, "--print-device-map", help="Print unit -> device, planned bytes."),
        dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
        dtype: str = typer.Option(AUTO, help=DTYPE_HELP),
        mobe_cache: str = typer.Option("auto", help=MOBE_CACHE_HELP),
        expert_cache: str | None = typer.Option(None, help=EXPERT_CACHE_HELP),
        json_out: bool = typer.Option(False, "--json", help="One JSON object on stdout instead of streamed text."),
    ):
        """Generate text, streaming tokens to stdout; speed and peak memory to stderr."""
        model = model_path(model, revision)
        from .runtime.generate import check_sampling
        from .runtime.generate import generate as run
        from .runtime.tokenizer import Tokenizer

        check_sampling(max_new_tokens, temperature, top_k, top_p, seed)
        dtype_name(dtype)
        if dry_run:
            return _dry_run(model, dtype, device_map, max_memory, expert_cache)
        if prompt == "-":
            prompt = sys.stdin.read()
        tok = Tokenizer(model)
        ids = tok.encode_chat(prompt) if chat else tok.encode(prompt)
        m = _load(model, tok, dtype, device_map, max_memory, offload_folder, mobe_cache, print_device_map, expert_cache)
        try:
            r = run(m, tok, ids, max_new_tokens, temperature, top_k, top_p, seed, stream=None if json_out else sys.stdout)
        finally:
            m.close()
        if json_out:
            d = {"model": str(model), "dtype": dtype_key(m.dtype), **r.as_dict()}
            d["device_map"] = {u: str(v) for u, v in m.plan.items()}
            print(json.dumps(d))
        ec, mc = r.expert_cache, r.mobe_cache
        hits = f", expert cache {ec['hits']} hits / {ec['misses']} misses" if ec else ""
        hits += f", MoBE cache hit rate {mc['hit_rate']:.2f} ({_mib(mc['cache_bytes'])})" if mc else ""
        print(f"{r.new_tokens} tokens ({r.stop_reason}), prefill {r.prefill_s:.3f}s ({r.prompt_tokens} tokens), "
              f"decode {r.tokens_per_s:.2f} tok/s, peak RSS {_mib(r.peak_rss_bytes)}, peak GPU {_mib(r.peak_gpu_bytes)}"
              f"{hits}", file=sys.stderr)

    @app.command("eval")
    @friendly
    def eval_cmd(
        model: Path = typer.Argument(..., help="Model directory (original or MoBE checkpoint), or a hub id in the "
                                     "local HF cache."),
        revision: str | None = typer.Option(None, help="With a hub id (Org/Name) for the model: the branch, tag or "
                                            "commit of its snapshot in the local Hugging Face cache (default main)."),
        text: Path = typer.Option(..., "--text", help="UTF-8 text file to score."),
        reference: Path | None = typer.Option(None, help="Also run this model (e.g. the source of a MoBE checkpoint, "
                                              "same tokenizer) on the same windows, with the same options, and report "
                                              "its perplexity, KL(reference || MODEL) per token and top-1 agreement. "
                                              "Both are loaded at once: --max-memory applies to each."),
        reference_revision: str | None = typer.Option(None, help="--revision for a --reference hub id."),
        ctx: int = typer.Option(512, help="Window length in tokens (non-overlapping windows)."),
        device_map: str = typer.Option("auto", help=DEVICE_MAP_HELP),
        max_memory: str | None = typer.Option(None, help=MAX_MEMORY_HELP),
        offload_folder: Path | None = typer.Option(None, help=OFFLOAD_HELP),
        print_device_map: bool = typer.Option(False, "--print-device-map", help="Print unit -> device, planned bytes."),
        dry_run: bool = typer.Option(False, "--dry-run", help=DRY_RUN_HELP),
        dtype: str = typer.Option(AUTO, help=DTYPE_HELP),
        mobe_cache: str = typer.Option("auto", help=MOBE_CACHE_HELP),
        expert_cache: str | None = typer.Option(None, help=EXPERT_CACHE_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print a JSON object."),
    ):
        """Perplexity of MODEL on a text file (and, with --reference, how far MODEL is from another model)."""
        model = model_path(model, revision)
        from .errors import CheckpointError, ConfigError
        from .runtime.eval import check_reference, compare, perplexity
        from .runtime.tokenizer import Tokenizer

        if ctx < 2:
            raise ConfigError(f"--ctx: must be at least 2 tokens, got {ctx}")
        if reference_revision is not None and reference is None:
            raise ConfigError("--reference-revision: only used with --reference")
        ref_dir = None if reference is None else model_path(reference, reference_revision)
        dtype_name(dtype)
        if dry_run:
            return _dry_run(model, dtype, device_map, max_memory, expert_cache)

        try:
            body = text.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read text file ({e})", text) from None
        tok = Tokenizer(model)
        if ref_dir is not None:
            check_reference(tok, Tokenizer(ref_dir), body)
        models = []
        try:
            for d in [model] if ref_dir is None else [model, ref_dir]:
                models.append(_load(d, tok, dtype, device_map, max_memory, offload_folder, mobe_cache, print_device_map,
                                    expert_cache))
            limit = min(m.cfg.max_position_embeddings for m in models)
            if ctx > limit:
                print(f"--ctx {ctx} is more than the model's max_position_embeddings ({limit}): using {limit}",
                      file=sys.stderr)
                ctx = limit
            with counted_progress("eval windows") as progress:
                if ref_dir is None:
                    r = perplexity(models[0], tok, body, ctx, progress)
                else:
                    r = compare(models[0], models[1], tok, body, ctx, progress)
        finally:
            for m in models:
                m.close()
        ref = {} if ref_dir is None else {"reference": str(ref_dir)}
        if json_out:
            print(json.dumps({"model": str(model), "text": str(text), "ctx": ctx, "dtype": dtype_key(models[0].dtype),
                              **ref, **r}))
            return
        print(f"perplexity {r['perplexity']:.4f} over {r['tokens']} tokens ({r['windows']} windows of {ctx}), "
              f"{r['tokens_per_s']:.1f} tok/s")
        if ref_dir is not None:
            print(f"reference perplexity {r['reference_perplexity']:.4f}, KL(reference || model) {r['kl']:.6f} "
                  f"nats/token, top-1 agreement {r['top1_agreement']:.4f}")
