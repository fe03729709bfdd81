"""Crash safety: SIGKILL at random moments, Ctrl-C, stale locks; results bit-identical to one run."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mobe_stream.errors import MobeError
from mobe_stream.pipeline.lock import OutputLock
from mobe_stream.synth import make_tiny_moe

from .helpers import REPO, all_tensors, dir_digest, run_cli

ARGS = ["--num-bases", "4", "--rank", "16", "--steps", "600", "--checkpoint-every", "0.2", "--quiet"]


def _popen(src, out, *extra):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return subprocess.Popen([sys.executable, "-m", "mobe_stream.cli", "compress", str(src), "--out", str(out), *ARGS, *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)


def _assert_same_tensors(a, b):
    ta, tb = all_tensors(a), all_tensors(b)
    assert set(ta) == set(tb)
    for n in ta:
        assert ta[n].dtype == tb[n].dtype and torch.equal(ta[n].view(torch.uint8), tb[n].view(torch.uint8)), n


def _wait_for_progress(proc, out: Path, timeout: float = 120) -> None:
    """Until the run has started writing (its journal exists) or has ended."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not (out / "mobe-journal.json").exists():
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="deepseek_v3", fp8=True)
    before = dir_digest(src)
    ref = tmp_path / "ref"
    run_cli("compress", str(src), "--out", str(ref), *ARGS, check=True)

    out = tmp_path / "out"
    rng = random.Random(1234)
    kills = 0
    for attempt in range(12):
        proc = _popen(src, out, *(["--resume"] if attempt else []))
        if kills < 5:
            _wait_for_progress(proc, out)
            time.sleep(rng.uniform(0.0, 1.5))  # a random moment: copying, fitting, checkpointing, writing
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
    else:
        pytest.fail("compress never completed")
    assert kills >= 3, "the test must really interrupt the run"
    _assert_same_tensors(ref, out)
    assert dir_digest(src) == before


def test_ctrl_c_checkpoints_and_resumes_bit_identical(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    ref = tmp_path / "ref"
    slow = ["--steps", "600", "--checkpoint-every", "1000"]
    run_cli("compress", str(src), "--out", str(ref), *ARGS, *slow, check=True)
    out = tmp_path / "out"
    proc = _popen(src, out, *slow)
    # wait until the solver is running (a state dir appears only at a checkpoint, so watch the journal)
    deadline = time.time() + 60
    while time.time() < deadline and not (out / "mobe-journal.json").exists():
        time.sleep(0.05)
    time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    stdout, stderr = proc.communicate(timeout=120)
    if proc.returncode == 0:
        pytest.skip("run finished before the interrupt arrived")
    assert proc.returncode == 130, stderr
    assert "--resume" in stderr
    assert not (out / ".mobe-stream.lock").exists()
    run_cli("compress", str(src), "--out", str(out), *ARGS, *slow, "--resume", check=True)
    _assert_same_tensors(ref, out)


def test_lock_blocks_second_run_and_stale_lock_is_taken_over(tmp_path):
    warnings = []
    with OutputLock(tmp_path):
        with pytest.raises(MobeError, match="locked by process"):
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / ".mobe-stream.lock").exists()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".mobe-stream.lock").write_text('{"pid": %d, "host": "%s"}' % (dead.pid, os.uname().nodename))
    with OutputLock(tmp_path, warn=warnings.append):
        pass
    assert warnings and "stale" in warnings[0]


def test_corrupted_finished_shard_is_redone(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    run_cli("compress", str(src), "--out", str(out), *ARGS, check=True)
    ref = all_tensors(out)
    shard = sorted(out.glob("model-*.safetensors"))[-1]
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF
    shard.write_bytes(bytes(data))
    proc = run_cli("compress", str(src), "--out", str(out), *ARGS, "--resume", check=True)
    assert "redoing" in proc.stderr
    again = all_tensors(out)
    assert all(torch.equal(ref[n].view(torch.uint8), again[n].view(torch.uint8)) for n in ref)


@pytest.mark.slow
def test_export_sigkill_then_resume_is_bit_identical(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe", num_layers=10, num_experts=64, hidden_size=256,
                        moe_intermediate_size=128)
    mobe = tmp_path / "mobe"
    run_cli("compress", str(src), "--out", str(mobe), "--num-bases", "4", "--rank", "32", "--steps", "1", "--quiet", check=True)
    before = dir_digest(mobe)
    ref = tmp_path / "ref"
    export_args = ["--dtype", "fp32", "--max-shard-size", "1MB", "--quiet"]
    t0 = time.monotonic()
    run_cli("export", str(mobe), "--out", str(ref), *export_args, check=True)
    duration = time.monotonic() - t0
    env = dict(os.environ, PYTHONPATH=str(REPO))
    out = tmp_path / "out"
    rng = random.Random(99)
    kills = 0
    for attempt in range(10):
        cmd = [sys.executable, "-m", "mobe_stream.cli", "export", str(mobe), "--out", str(out), *export_args]
        proc = subprocess.Popen(cmd + (["--resume"] if attempt else []), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
        if kills < 3:
            time.sleep(rng.uniform(0.3, 0.7) * duration)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                kills += 1
        _, stderr = proc.communicate(timeout=600)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, stderr
    assert kills >= 1
    _assert_same_tensors(ref, out)
    assert dir_digest(mobe) == before


def _sigstop_when(proc, ready, timeout: float = 120) -> bool:
    """Freeze `proc` (SIGSTOP) as soon as ready() holds; False if it ended first. A frozen process
    receives the next signal at a point we chose, not at a moment raced against its progress."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if ready():
            proc.send_signal(signal.SIGSTOP)
            return proc.poll() is None
        time.sleep(0.002)
    return False


def _journal_units(out: Path) -> int:
    import json

    try:
        return len(json.loads((out / "mobe-journal.json").read_text())["units"])
    except (OSError, ValueError, KeyError):
        return 0


def test_sigbus_names_the_line_and_the_run_resumes(tmp_path):
    """SIGBUS (a source shard cut under the mmap between the reader's size check and the read)
    cannot be caught; faulthandler at least says where, and --resume finishes the run."""
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    args = ["--steps", "200", "--checkpoint-every", "1000"]
    proc = _popen(src, out, *args)
    if not _sigstop_when(proc, lambda: _journal_units(out) >= 1):
        pytest.skip("run finished before it could be stopped")
    proc.send_signal(signal.SIGBUS)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGBUS, stderr
    assert "Fatal Python error: Bus error" in stderr and 'File "' in stderr, stderr
    run_cli("compress", str(src), "--out", str(out), *ARGS, *args, "--resume", check=True)
    assert not (out / ".mobe-stream.lock").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_export_signal_stops_cleanly_and_resumes_identical(tmp_path, sig):
    from mobe_stream.pipeline.compress import compress
    from mobe_stream.pipeline.export import ExportOptions, export
    from mobe_stream.pipeline.options import CompressOptions

    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe", num_layers=8, num_experts=16, hidden_size=128,
                        moe_intermediate_size=64)
    mobe = tmp_path / "mobe"
    compress(src, mobe, CompressOptions(method="svd", num_bases=4, rank=16))
    ref = tmp_path / "ref"
    export(mobe, ref, ExportOptions(dtype="fp32", max_shard_size="100KB"))
    args = ["--dtype", "fp32", "--max-shard-size", "100KB", "--quiet"]
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-m", "mobe_stream.cli", "export", str(mobe), "--out", str(out), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    if not _sigstop_when(proc, lambda: _journal_units(out) >= 2):
        pytest.skip("export finished before it could be stopped")
    proc.send_signal(sig)
    proc.send_signal(signal.SIGCONT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert stderr.strip() == "error: interrupted; rerun with --resume", stderr
    assert not (out / ".mobe-stream.lock").exists()
    assert _journal_units(out) < 9, "the export must really have been interrupted"
    run_cli("export", str(mobe), "--out", str(out), *args, "--resume", check=True)
    _assert_same_tensors(ref, out)
    assert dir_digest(out)["config.json"] == dir_digest(ref)["config.json"]
    assert not list(out.glob("*.tmp-*"))
