"""Shared test helpers: hashing a directory, reading every tensor of a model dir, running the CLI."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]


def dir_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under path (relative name -> hex), plus mtimes would be too strict."""
    out = {}
    for p in sorted(Path(path).rglob("*")):
        if p.is_file():
            out[str(p.relative_to(path))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def all_tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    from mobe_stream.checkpoint.reader import CheckpointReader

    with CheckpointReader(model_dir) as r:
        return {n: r.get(n).clone() for n in r.names()}


def tiny_source_and_mobe(root: Path) -> dict[str, Path]:
    """A tiny qwen3_moe source and its MoBE compression: {"compress": src, "export": mobe}."""
    from mobe_stream.pipeline.compress import compress
    from mobe_stream.pipeline.options import CompressOptions
    from mobe_stream.synth import make_tiny_moe

    src = make_tiny_moe(root / "src", family="qwen3_moe")
    compress(src, root / "mobe", CompressOptions(num_bases=4, rank=16, steps=5, checkpoint_every=1e9))
    return {"compress": src, "export": root / "mobe"}


def run_cli(*args: str, check: bool = False, timeout: float = 600, extra_env: dict | None = None,
            **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {}))
    proc = subprocess.run([sys.executable, "-m", "mobe_stream.cli", *args], capture_output=True, text=True,
                          env=env, timeout=timeout, **kw)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def hf_text_logits(model, ids):
    """transformers' logits [batch, seq, vocab] for token ids. A multimodal Llama-4 is asked through
    its text model: transformers 5.24's Llama4ForConditionalGeneration.forward fails on text-only
    input (it reads `image_outputs` off the text model's output), and text-only its forward is the
    text model's anyway (same embedding, decoder and head)."""
    if type(model).__name__ == "Llama4ForConditionalGeneration":
        model = model.language_model
    return model(input_ids=ids).logits
