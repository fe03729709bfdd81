#!/usr/bin/env python3
"""Peak host RSS of `compress` on Kimi-shaped wide models of different depths.

Streaming means peak RSS is about one layer's working set whatever the depth: the two figures
printed here should agree (the acceptance bound is 15%). Each compress runs in its own process;
its peak RSS is the kernel's ru_maxrss for that child (os.wait4), cross-checked by psutil sampling.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def run_compress(src: Path, out: Path, steps: int, extra: list[str]) -> tuple[float, int, int]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "mobe_stream.cli", "compress", str(src), "--out", str(out), "--steps", str(steps),
           "--quiet", "--overwrite", *extra]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL)
    peak = [0]

    def sample():
        try:
            p = psutil.Process(proc.pid)
            while proc.poll() is None:
                peak[0] = max(peak[0], p.memory_info().rss)
                time.sleep(0.02)
        except psutil.NoSuchProcess:
            pass

    th = threading.Thread(target=sample, daemon=True)
    th.start()
    _, status, rusage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    th.join()
    if proc.returncode != 0:
        raise SystemExit(f"compress failed with exit code {proc.returncode}")
    return time.perf_counter() - t0, rusage.ru_maxrss * 1024, peak[0]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--depths", default="4,32", help="comma-separated layer counts")
    ap.add_argument("--experts", type=int, default=384)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--intermediate", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--fp8", action="store_true", help="FP8 block-scaled source (hidden/intermediate multiples of 128 fit best)")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--extra", default="--num-bases 8 --rank 64", help="extra compress arguments")
    args = ap.parse_args()
    from mobe_stream.synth import make_wide_kimi

    work = args.workdir or Path(tempfile.mkdtemp(prefix="mobe-bench-mem-"))
    rows = []
    for depth in [int(x) for x in args.depths.split(",")]:
        src = work / f"kimi-wide-{depth}"
        if not src.exists():
            make_wide_kimi(src, num_layers=depth, num_experts=args.experts, hidden_size=args.hidden,
                           moe_intermediate_size=args.intermediate, fp8=args.fp8)
        size = sum(f.stat().st_size for f in src.glob("*.safetensors"))
        secs, maxrss, sampled = run_compress(src, work / f"out-{depth}", args.steps, args.extra.split())
        rows.append((depth, size, secs, maxrss, sampled))
    print(f"Kimi-shaped wide models: {args.experts} experts, hidden {args.hidden}, moe_intermediate {args.intermediate}, "
          f"{'fp8' if args.fp8 else 'bf16'}, steps {args.steps}, {args.extra}")
    print(f"{'layers':>6} {'source GB':>10} {'time s':>8} {'s/MoE layer':>11} "
          f"{'peak RSS MiB (wait4)':>21} {'peak RSS MiB (psutil)':>22}")
    for depth, size, secs, maxrss, sampled in rows:
        print(f"{depth:>6} {size / 1e9:>10.3f} {secs:>8.1f} {secs / max(1, depth - 1):>11.2f} "
              f"{maxrss / 2**20:>21.1f} {sampled / 2**20:>22.1f}")
    if len(rows) >= 2:
        a, b = rows[0][3], rows[-1][3]
        print(f"peak RSS ratio deepest/shallowest: {b / a:.3f} ({'within' if abs(b / a - 1) <= 0.15 else 'OUTSIDE'} 15%)")


if __name__ == "__main__":
    main()
