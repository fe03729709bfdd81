"""Crash safety: SIGKILL at random moments, Ctrl-C, stale locks; results bit-identical to one run."""

from __future__ import annotations

import json
import multiprocessing
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.checkpoint.safetensors_io import read_header
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


def _stale_lock_record() -> str:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return json.dumps({"pid": dead.pid, "host": os.uname().nodename})


def test_lock_blocks_second_run_and_stale_lock_is_taken_over(tmp_path):
    warnings = []
    with OutputLock(tmp_path):
        with pytest.raises(MobeError, match=f"locked by process {os.getpid()} on "):
            OutputLock(tmp_path).acquire()
    assert not (tmp_path / ".mobe-stream.lock").exists()
    (tmp_path / ".mobe-stream.lock").write_text(_stale_lock_record())
    with OutputLock(tmp_path, warn=warnings.append):
        pass
    assert warnings and "stale" in warnings[0]
    assert not (tmp_path / ".mobe-stream.lock").exists()


def _race_for_lock(lock_dir: Path, barrier, rounds: int, results) -> None:
    """One racer: each round, try to take the (stale) lock; while holding it, claim an O_EXCL marker."""
    marker = lock_dir / "holder"
    wins = overlaps = 0
    for _ in range(rounds):
        barrier.wait(timeout=60)  # the parent has planted a stale lock
        try:
            with OutputLock(lock_dir):
                wins += 1
                try:
                    os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
                except FileExistsError:
                    overlaps += 1  # someone else holds the lock right now
                else:
                    time.sleep(0.05)
                    marker.unlink()
        except MobeError:
            pass
        barrier.wait(timeout=60)
    results.put((wins, overlaps))


def test_racing_takeovers_of_a_stale_lock_never_give_two_holders(tmp_path):
    racers, rounds = 4, 20
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(racers + 1), ctx.Queue()
    procs = [ctx.Process(target=_race_for_lock, args=(tmp_path, barrier, rounds, results)) for _ in range(racers)]
    for p in procs:
        p.start()
    stale = _stale_lock_record()
    for _ in range(rounds):
        (tmp_path / ".mobe-stream.lock").write_text(stale)
        barrier.wait(timeout=60)
        barrier.wait(timeout=60)
    outcome = [results.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(timeout=60)
    assert sum(overlaps for _, overlaps in outcome) == 0, outcome
    assert sum(wins for wins, _ in outcome) >= rounds
    assert not (tmp_path / ".mobe-stream.lock").exists()


def test_lock_of_a_sigkilled_run_is_taken_over(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    script = ("import sys, time\nfrom mobe_stream.pipeline.lock import OutputLock\n"
              "OutputLock(sys.argv[1]).acquire(); print('held', flush=True); time.sleep(600)")
    holder = subprocess.Popen([sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(MobeError, match=f"locked by process {holder.pid} on "):
            OutputLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert (tmp_path / ".mobe-stream.lock").exists()  # nothing ran to remove it
    warnings = []
    with OutputLock(tmp_path, warn=warnings.append):
        pass
    assert len(warnings) == 1 and f"stale lock of process {holder.pid}" in warnings[0]


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


FAST = ["--num-bases", "4", "--rank", "16", "--steps", "5", "--quiet"]


def _compressed(tmp_path: Path) -> tuple[Path, Path]:
    """A finished run: a source big enough to have expert bytes outside fingerprint()'s samples."""
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe", hidden_size=256, moe_intermediate_size=128,
                        num_experts=16)
    out = tmp_path / "out"
    run_cli("compress", str(src), "--out", str(out), *FAST, check=True)
    return src, out


def _expert_byte_outside_samples(src: Path) -> tuple[Path, int]:
    """A shard and the offset of an expert weight byte that none of the three 64 KiB samples reads."""
    window = 1 << 16
    with CheckpointReader(src) as r:
        for name in r.names():
            info = r.info(name)
            if ".experts." not in name:
                continue
            path = r.shard_path(info.shard)
            header = read_header(path)
            start, end = header.data_start, header.file_size
            samples = [(p, p + window) for p in (start, (start + end) // 2, max(start, end - window))]
            for pos in range(info.offset, info.offset + info.nbytes, 512):
                if not any(a - window <= pos < b + window for a, b in samples):
                    return path, pos
    raise AssertionError("test checkpoint too small: every expert byte lies in a sampled window")


def _refused_resume(src: Path, out: Path) -> str:
    before = dir_digest(out)
    proc = run_cli("compress", str(src), "--out", str(out), *FAST, "--resume")
    assert proc.returncode == 2, proc.stderr
    assert dir_digest(out) == before  # nothing written, the lock released
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "source checkpoint changed" in lines[0], proc.stderr
    return lines[0]


def test_resume_refuses_an_expert_edited_in_place_between_the_samples(tmp_path):
    src, out = _compressed(tmp_path)
    shard, pos = _expert_byte_outside_samples(src)
    with open(shard, "r+b") as f:  # same size, same header, same sampled bytes
        f.seek(pos)
        byte = f.read(1)[0]
        f.seek(pos)
        f.write(bytes([byte ^ 0x01]))
    line = _refused_resume(src, out)
    assert f"{shard.name} (modified" in line and "--overwrite" in line


def test_resume_refuses_an_in_place_edit_whose_mtime_was_put_back(tmp_path):
    src, out = _compressed(tmp_path)
    shard, pos = _expert_byte_outside_samples(src)
    st = shard.stat()
    time.sleep(0.05)  # let the kernel's coarse ctime clock tick past the previous write
    with open(shard, "r+b") as f:
        f.seek(pos)
        f.write(b"\x7f")
    os.utime(shard, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert _refused_resume(src, out).count("changed in place") == 1


def test_resume_refuses_a_changed_config(tmp_path):
    src, out = _compressed(tmp_path)
    cfg = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**cfg, "note": "edited"}))
    assert "config.json content differs" in _refused_resume(src, out)


def test_resume_of_an_untouched_source_and_of_an_older_journal(tmp_path):
    src, out = _compressed(tmp_path)
    run_cli("compress", str(src), "--out", str(out), *FAST, "--resume", check=True)
    journal = out / "mobe-journal.json"
    data = json.loads(journal.read_text())
    data["source_fingerprint"] = data["source_fingerprint"]["digest"]  # as journaled before file identities
    del data["settings"]["precision"]  # as journaled before --precision (those runs were fp32 = auto on a CPU)
    del data["settings"]["schedule"]  # as journaled before --schedule (those runs stepped with a constant lr)
    journal.write_text(json.dumps(data))
    run_cli("compress", str(src), "--out", str(out), *FAST, "--resume", check=True)
    for option, value in (("--precision", "bf16"), ("--schedule", "decay")):  # today's default, not that run's
        proc = run_cli("compress", str(src), "--out", str(out), *FAST, option, value, "--resume")
        assert proc.returncode == 2 and option[2:] in proc.stderr, proc.stderr


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


def test_resume_reuses_the_journal_settings_and_refuses_typed_differences(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    run_cli("compress", str(src), "--out", str(out), "--num-bases", "4", "--rank", "16", "--steps", "3",
            "--layers", "1", "--dtype", "fp32", "--quiet", check=True)
    before = dir_digest(out)
    proc = run_cli("compress", str(src), "--out", str(out), "--resume")  # nothing retyped
    assert proc.returncode == 0, proc.stderr
    assert "--steps" in proc.stderr and "--num-bases" in proc.stderr  # says what it took from the journal
    assert dir_digest(out) == before
    proc = run_cli("compress", str(src), "--out", str(out), "--resume", "--steps", "4")
    assert proc.returncode == 2 and "steps: was 3, now 4" in proc.stderr, proc.stderr
