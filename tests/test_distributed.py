"""compress under torchrun (gloo, CPU): several ranks split the units through the journal and the
output is bit-identical to one process; a rank killed with SIGKILL stops the group, and --resume
(another world size) finishes it, still bit-identical."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from mobe_stream.synth import make_tiny_moe
from tests.helpers import REPO, run_cli

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")
SAME = ("config.json", "manifest.json", "model.safetensors.index.json")
ONE_THREAD = {"OMP_NUM_THREADS": "1"}  # torch's CPU matmuls round differently with another thread count


def _torchrun(n: int, *args: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(n),
                             "--master-port", str(29500 + os.getpid() % 1000), "-m", "mobe_stream", "compress", *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _digests(out: Path) -> dict[str, str]:
    names = [p.name for p in out.glob("model-*.safetensors")] + list(SAME)
    return {n: hashlib.sha256((out / n).read_bytes()).hexdigest() for n in sorted(names)}


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("d") / "src", "qwen3_moe", num_layers=4, num_shards=2)


ARGS = ("--steps", "60", "--num-bases", "2", "--checkpoint-every", "0.2")


def test_two_ranks_match_one_process(src, tmp_path):
    run_cli("compress", str(src), "--out", str(tmp_path / "one"), *ARGS, check=True, extra_env=ONE_THREAD)
    log = tmp_path / "events.jsonl"
    proc = _torchrun(2, str(src), "--out", str(tmp_path / "two"), *ARGS, "--log-json", str(log))
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    assert out.count("expert params") == 1  # rank 0 reports, once
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    units = json.loads((tmp_path / "two" / "mobe-journal.json").read_text())["units"]
    assert {u["info"].get("rank") for u in units.values()} == {0, 1}  # both ranks did units
    # rank 0 shows every rank's progress: each unit's unit_done once in --log-json, with the rank
    # that did it, and a "done" line for each on rank 0's stderr (piped: heartbeat lines)
    done = [e for e in map(json.loads, log.read_text().splitlines()) if e["event"] == "unit_done"]
    assert sorted(e["unit"] for e in done) == sorted(units)
    assert all(e["rank"] == units[e["unit"]]["info"]["rank"] for e in done)
    assert all(err.count(f"rank {u['info']['rank']}: {k} done in") == 1 for k, u in units.items()), err[-3000:]
    assert not (tmp_path / "two" / ".mobe-state" / "progress").exists()


def test_two_nodes_through_c10d_rendezvous_on_a_shared_out(src, tmp_path):
    """Multi-node as users launch it (`torchrun --nnodes 2 --rdzv-backend c10d ...` once per node,
    OUT on a shared filesystem), both "nodes" on this machine; the result equals one process."""
    run_cli("compress", str(src), "--out", str(tmp_path / "one"), *ARGS, check=True, extra_env=ONE_THREAD)
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    port = 29000 + os.getpid() % 500
    # the mobe-stream console script under torchrun (--no-python), as an installed user would
    script = str(Path(sys.executable).with_name("mobe-stream"))
    launch = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc-per-node", "1",
              "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "mobe-test"]
    nodes = [subprocess.Popen([*launch, *(["--no-python", script] if node and Path(script).exists()
                                          else ["-m", "mobe_stream"]),
                               "compress", str(src), "--out", str(tmp_path / "two"), *ARGS],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for node in (0, 1)]
    for proc in nodes:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    assert _digests(tmp_path / "two") == _digests(tmp_path / "one")
    ranks = {u["info"].get("rank") for u in json.loads((tmp_path / "two" / "mobe-journal.json").read_text())["units"].values()}
    assert ranks == {0, 1}


def test_killed_rank_then_resume_with_another_world_size(src, tmp_path):
    run_cli("compress", str(src), "--out", str(tmp_path / "one"), *ARGS, check=True, extra_env=ONE_THREAD)
    out = tmp_path / "two"
    proc = _torchrun(2, str(src), "--out", str(out), *ARGS)
    journal = out / "mobe-journal.json"
    deadline = time.time() + 300
    while time.time() < deadline:  # kill rank 1 once a few units are journaled
        if journal.exists() and len(json.loads(journal.read_text() or "{}").get("units", {})) >= 3:
            break
        time.sleep(0.05)
    victims = [p for p in psutil.Process(proc.pid).children(recursive=True)
               if p.environ().get("RANK") == "1" and "mobe_stream" in " ".join(p.cmdline())]
    assert victims, "rank 1 not found"
    os.kill(victims[0].pid, signal.SIGKILL)
    proc.communicate(timeout=600)
    assert proc.returncode != 0  # torchrun stops the group when a worker dies
    done = json.loads(journal.read_text())
    assert not done.get("complete")
    resumed = _torchrun(3, str(src), "--out", str(out), *ARGS, "--resume")
    _, err = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, err[-2000:]
    assert _digests(out) == _digests(tmp_path / "one")


def test_racing_ranks_take_a_dead_ranks_claim_exactly_once(tmp_path):
    """Ranks racing for a unit whose claim belongs to a dead process: exactly one takes it (each
    attempt, many times over), and nobody takes a live claim."""
    import threading

    from mobe_stream.pipeline.dist import Claims, World

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    claims = [Claims(tmp_path, World(r, 4)) for r in range(4)]
    try:
        for i in range(30):
            key = f"layer.{i}.gate_proj"
            path = claims[0]._path(key)
            path.write_text(json.dumps({"host": claims[0].host, "pid": int(dead.stdout), "rank": 1, "time": 0}))
            won: list[int] = []
            go = threading.Barrier(4)

            def take(r: int, key: str = key, won: list[int] = won, go: threading.Barrier = go) -> None:
                go.wait()
                if claims[r].try_claim(key):
                    won.append(r)

            threads = [threading.Thread(target=take, args=(r,)) for r in range(4)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert len(won) == 1, (i, won)
            assert not any(c.try_claim(key) for c in claims)  # the winner is alive: its claim holds
    finally:
        for c in claims:
            c.close()
