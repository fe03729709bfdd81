"""The tool understands its own outputs: inspect describes them, an unfinished one says what to do."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

from mobe_stream.synth import make_tiny_moe

from .helpers import REPO, run_cli, tiny_source_and_mobe


def test_inspect_describes_compact_and_exported_outputs(tmp_path):
    paths = tiny_source_and_mobe(tmp_path)
    src, mobe = paths["compress"], paths["export"]
    summary = json.loads((mobe / "config.json").read_text())["mobe"]
    info = json.loads(run_cli("inspect", str(mobe), "--json", check=True).stdout)["mobe"]
    assert (info["form"], info["num_bases"], info["rank"], info["layers"]) == ("compact", 4, 16, summary["layers"])
    source = json.loads(run_cli("inspect", str(src), "--json", check=True).stdout)
    assert info["expert_params_original"] == source["expert_params"]
    assert 0 < info["expert_reduction"] < 1 and info["expert_params"] < source["expert_params"]
    exported = tmp_path / "exported"
    run_cli("export", str(mobe), "--out", str(exported), "--quiet", check=True)
    info = json.loads(run_cli("inspect", str(exported), "--json", check=True).stdout)["mobe"]
    assert info["form"] == "exported" and info["num_bases"] == 4 and info["expert_reduction"] == 0
    assert "Traceback" not in run_cli("inspect", str(mobe), check=True).stderr


def test_generate_on_an_unfinished_output_says_resume(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "mobe_stream.cli", "compress", str(src), "--out", str(out), "--num-bases", "4",
           "--rank", "16", "--steps", "1000000", "--checkpoint-every", "0.2", "--quiet"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, PYTHONPATH=str(REPO)))
    deadline = time.time() + 120
    while time.time() < deadline and not list((out / ".mobe-state").glob("*.zst")):  # a fit is under way
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode == 130
    for command in (["generate", str(out), "--prompt", "hi"], ["eval", str(out), "--text", str(src / "config.json")],
                    ["inspect", str(out)]):
        res = run_cli(*command)
        assert res.returncode == 2 and "incomplete run" in res.stderr and "--resume" in res.stderr, res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
