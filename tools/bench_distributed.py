#!/usr/bin/env python3
"""Wall time of `compress` in one process against torchrun ranks on this machine (issue 13's figure).

Runs, each on the same tiny multi-layer checkpoint and settings, one after another:
  1 process, 1 thread | 1 process, N threads | torchrun N ranks x 1 thread (units split by claims)
  | torchrun N ranks x 1 thread --expert-parallel (each projection split over the ranks)
and prints wall seconds, the summed peak RSS of the run's processes, and the largest relative
difference of any output tensor against the 1-process run (0 for unit claims: bit-identical).
Nothing is asserted; figures go into issue notes.

    python tools/bench_distributed.py --ranks 2 --layers 5 --experts 32 --hidden 512 --steps 60
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from mobe_stream.checkpoint.reader import CheckpointReader  # noqa: E402
from mobe_stream.synth import make_tiny_moe  # noqa: E402


def run(cmd: list[str], threads: int) -> tuple[float, int]:
    """(wall seconds, peak of the summed RSS of the process tree)."""
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS=str(threads))
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    top = psutil.Process(proc.pid)
    peak = 0
    while proc.poll() is None:
        try:
            rss = sum(p.memory_info().rss for p in [top, *top.children(recursive=True)])
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.1)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr.read()[-2000:]}")
    return wall, peak


def max_rel_diff(a: Path, b: Path) -> float:
    worst = 0.0
    with CheckpointReader(a) as ra, CheckpointReader(b) as rb:
        for name in rb.names():
            x, y = ra.get(name).float(), rb.get(name).float()
            worst = max(worst, float((x - y).abs().max()) / max(float(y.abs().max()), 1e-30))
    return worst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--inter", type=int, default=256)
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--num-bases", type=int, default=8)
    ap.add_argument("--json", type=Path, default=None)
    a = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-dist-"))
    src = make_tiny_moe(work / "src", "qwen3_moe", num_layers=a.layers, num_experts=a.experts, hidden_size=a.hidden,
                        moe_intermediate_size=a.inter, num_shards=2, dtype=torch.float32)
    common = ["compress", str(src), "--steps", str(a.steps), "--num-bases", str(a.num_bases), "--dtype", "fp32",
              "--checkpoint-every", "1000", "-q"]
    single = [sys.executable, "-m", "mobe_stream"]
    tr = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(a.ranks),
          "--master-port", str(29000 + os.getpid() % 1000), "-m", "mobe_stream"]
    n = a.ranks
    runs = [("1 process, 1 thread", single, 1, []), (f"1 process, {n} threads", single, n, []),
            (f"torchrun {n} ranks x 1 thread (unit claims)", tr, 1, []),
            (f"torchrun {n} ranks x 1 thread --expert-parallel", tr, 1, ["--expert-parallel"])]
    rows = []
    ref = work / "out0"
    for i, (label, launcher, threads, extra) in enumerate(runs):
        out = work / f"out{i}"
        wall, peak = run([*launcher, *common, "--out", str(out), *extra], threads)
        diff = 0.0 if i == 0 else max_rel_diff(out, ref)
        rows.append({"run": label, "seconds": round(wall, 1), "peak_rss_mb": round(peak / 2**20), "max_rel_diff": diff})
        print(f"{label:<48} {wall:7.1f} s  peak RSS {peak / 2**20:6.0f} MiB  max rel. diff vs 1 process {diff:.1e}",
              flush=True)
    base = rows[0]["seconds"]
    print("speed-up vs 1 process x 1 thread: " + ", ".join(f"{r['run']}: {base / r['seconds']:.2f}x" for r in rows[1:]))
    print(f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f}; model {a.layers} layers, "
          f"{a.experts} experts of {a.inter}x{a.hidden}, {a.steps} steps, m={a.num_bases}")
    if a.json:
        a.json.write_text(json.dumps({"args": vars(a) | {"json": str(a.json)}, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
