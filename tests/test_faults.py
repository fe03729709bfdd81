"""Disk full, NaN in the solver: clean failures that resume, never a partial file under a final name."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import pytest
import torch

from mobe_stream.synth import make_tiny_moe

from .helpers import all_tensors, dir_digest, run_cli, tiny_source_and_mobe

ARGS = ["--num-bases", "4", "--rank", "16", "--steps", "10", "--quiet", "--max-shard-size", "200KB"]


def _small_fs(path: Path, size: str) -> bool:
    """Mount a size-limited tmpfs at path (root only); False where that is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    return subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                          capture_output=True).returncode == 0


def _assert_no_partial_final_files(out: Path, index_names: set[str] | None = None) -> None:
    from mobe_stream.checkpoint.safetensors_io import read_header

    for f in out.glob("*.safetensors"):
        read_header(f)  # every file under a final name is a complete shard


def test_disk_full_gives_clean_error_and_resumes(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="deepseek_v3")
    before = dir_digest(src)
    ref = tmp_path / "ref"
    run_cli("compress", str(src), "--out", str(ref), *ARGS, check=True)
    total = sum(f.stat().st_size for f in ref.glob("*.safetensors"))

    mnt = tmp_path / f"fs-{uuid.uuid4().hex[:6]}"
    mounted = _small_fs(mnt, str(max(64 * 1024, total // 2)))
    out = mnt / "out"
    env = None if mounted else {"MOBE_STREAM_FAULT": f"enospc_after_bytes={total // 2}"}
    try:
        proc = run_cli("compress", str(src), "--out", str(out), *ARGS, "--force", extra_env=env)
        assert proc.returncode == 2, proc.stderr
        line = proc.stderr.strip().splitlines()[-1]
        assert "disk full" in line and "--resume" in line, proc.stderr
        _assert_no_partial_final_files(out)
        if mounted:  # "free space": grow the filesystem
            subprocess.run(["mount", "-o", f"remount,size={4 * total + 10**6}", str(mnt)], check=True)
        run_cli("compress", str(src), "--out", str(out), *ARGS, "--resume", check=True)
        a, b = all_tensors(ref), all_tensors(out)
        assert set(a) == set(b) and all(torch.equal(a[n].view(torch.uint8), b[n].view(torch.uint8)) for n in a)
        assert not list(out.glob("*.tmp-*"))
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(mnt)])
    assert dir_digest(src) == before


def _events(log: Path) -> list[dict]:
    import json

    return [json.loads(line) for line in log.read_text().splitlines()]


@pytest.mark.parametrize("fault,needle", [("nan_at_step=15", "non-finite loss at step"),
                                          ("oom_at_step=15", "out of memory")])
def test_solver_faults_recover_and_finish(tmp_path, fault, needle):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out, log = tmp_path / "out", tmp_path / "log.jsonl"
    proc = run_cli("compress", str(src), "--out", str(out), "--num-bases", "4", "--rank", "16", "--steps", "40",
                   "--checkpoint-every", "0", "--quiet", "--log-json", str(log), extra_env={"MOBE_STREAM_FAULT": fault},
                   check=True)
    warnings = [e for e in _events(log) if e["event"] == "warning"]
    assert any(needle in w["text"] for w in warnings), warnings
    assert needle in proc.stderr
    t = all_tensors(out)
    assert all(torch.isfinite(v.float()).all() for n, v in t.items() if ".mobe_" in n)
    import json

    cfg = json.loads((out / "config.json").read_text())
    assert all(0 < e < 1 for layer in cfg["mobe"]["errors"].values() for e in layer.values())
    if fault.startswith("nan"):
        done = [e for e in _events(log) if e["event"] == "unit_done" and e.get("kind") == "factorize"]
        assert any(e["lr_final"] == pytest.approx(0.035) for e in done)


def test_preflight_refuses_without_force(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    mnt = tmp_path / "tiny-fs"
    if not _small_fs(mnt, "64k"):
        pytest.skip("needs root to mount a size-limited filesystem")
    try:
        proc = run_cli("compress", str(src), "--out", str(mnt / "out"), "--steps", "2", "--quiet")
        assert proc.returncode == 2 and "GB is free" in proc.stderr and "--force" in proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)])


# A disk that fills up while a small file is written: the message names that file, never a temporary
# (a write error itself carries no file name), nothing half-written remains, --resume finishes.
SMALL_FILES = [
    ("compress", "mobe-journal.json", "mobe-journal.json"),
    ("compress", ".state.zst", ".mobe-state/layer.1.gate_proj.state.zst"),
    ("compress", "config.json", "config.json"),
    ("compress", "model.safetensors.index.json", "model.safetensors.index.json"),
    ("compress", "manifest.json", "manifest.json"),
    ("export", "config.json", "config.json"),
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return tiny_source_and_mobe(tmp_path_factory.mktemp("tiny"))


@pytest.mark.parametrize("command,suffix,written", SMALL_FILES, ids=[f"{c}-{s}" for c, s, _ in SMALL_FILES])
def test_disk_full_on_small_file_names_it(tmp_path, tiny, command, suffix, written):
    out = tmp_path / "out"
    args = [command, str(tiny[command]), "--out", str(out), "--quiet"]
    if command == "compress":
        args += ["--num-bases", "4", "--rank", "16", "--steps", "5", "--checkpoint-every", "0.0001"]
    proc = run_cli(*args, extra_env={"MOBE_STREAM_FAULT": f"enospc_writing={suffix}"})
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"error: {out / written}: disk full") and "--resume" in lines[0], lines[0]
    assert not list(out.rglob("*.tmp-*")) and not (out / ".mobe-stream.lock").exists()
    run_cli(*args, "--resume", check=True)
    assert not list(out.rglob("*.tmp-*"))


def test_sigterm_while_a_failed_job_unwinds_still_gives_its_error_line(tmp_path):
    """torchrun SIGTERMs the surviving ranks the moment one dies: typically just after the survivor's
    collective failed and its job's block exited. The process must still release its lock and print
    why it stops, with the error's exit code (before: killed by the default action, exit -15, silent).
    The fault sends that SIGTERM at exactly that moment, after a disk-full error."""
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    proc = run_cli("compress", str(src), "--out", str(out), *ARGS,
                   extra_env={"MOBE_STREAM_FAULT": "enospc_after_bytes=1000,sigterm_while_failing=1"})
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "disk full" in proc.stderr.strip().splitlines()[-1]
    assert not (out / ".mobe-stream.lock").exists()
    run_cli("compress", str(src), "--out", str(out), *ARGS, "--resume", check=True)


def test_sigterm_guard_is_ctrl_c_except_while_a_failed_job_unwinds():
    """guard_process (the CLI's): SIGTERM raises KeyboardInterrupt; after a job's block failed it is
    ignored until the next job starts (demo handles an interruption and carries on)."""
    import signal

    from mobe_stream.pipeline.events import Reporter
    from mobe_stream.pipeline.job import StopFlag
    from mobe_stream.pipeline.signals import catch_signals, guard_process

    before = signal.getsignal(signal.SIGTERM)
    try:
        guard_process()
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(ValueError), catch_signals(StopFlag(), Reporter([])):
            raise ValueError("a failing job")
        os.kill(os.getpid(), signal.SIGTERM)  # ignored: the error is on its way to its line
        with catch_signals(StopFlag(), Reporter([])):
            pass
        with pytest.raises(KeyboardInterrupt):  # a new job ran: SIGTERM is Ctrl-C again
            os.kill(os.getpid(), signal.SIGTERM)
    finally:
        signal.signal(signal.SIGTERM, before)
