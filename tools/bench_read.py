#!/usr/bin/env python3
"""Read throughput and memory of CheckpointReader vs plain `cat` on a synthetic sharded checkpoint.

Streaming compression only works if reading one tensor at a time is close to disk speed and RSS
stays near one tensor, not one shard. This writes (or reuses, --dir) a multi-shard bf16 checkpoint
with ShardWriter, then measures:
  (a) `cat shards > /dev/null` wall time (the sequential-read baseline);
  (b) CheckpointReader.get of every tensor, one by one, touched (sum) and released:
      wall time, GB/s, peak RSS (psutil sampling thread + ru_maxrss of a fresh child process).
The page cache is NOT dropped (that needs root), so both figures are usually warm-cache numbers;
run with a --dir on a cold disk after `echo 3 > /proc/sys/vm/drop_caches` (as root) for cold ones.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import psutil  # noqa: E402
import torch  # noqa: E402

from mobe_stream.checkpoint.reader import CheckpointReader  # noqa: E402
from mobe_stream.checkpoint.writer import ShardWriter, write_index_and_manifest  # noqa: E402
from mobe_stream.sizes import parse_size  # noqa: E402

GB = 10**9


def make_checkpoint(d: Path, size_bytes: int, side: int, shard_size: int) -> None:
    """bf16 [side, side] tensors totalling ~size_bytes; skipped if the index is already there."""
    if (d / "model.safetensors.index.json").exists():
        return
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps({"model_type": "bench"}))
    per = side * side * 2
    w = ShardWriter(d, max_shard_size=shard_size)
    g = torch.Generator().manual_seed(0)
    records = []
    for i in range(max(1, size_bytes // per)):
        w.add(f"model.layers.{i}.weight", torch.randn(side, side, generator=g).to(torch.bfloat16))
        if w.pending_bytes >= shard_size:
            records += w.flush()  # keep at most ~one shard of tensors in RAM while writing
    records += w.flush()
    write_index_and_manifest(d, records)


class PeakSampler:
    """Samples this process's RSS and its file-backed share (mmapped shard pages) every 10 ms."""

    def __init__(self) -> None:
        self.proc = psutil.Process()
        self.peak_rss = self.peak_anon = 0
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            m = self.proc.memory_info()
            self.peak_rss = max(self.peak_rss, m.rss)
            self.peak_anon = max(self.peak_anon, m.rss - getattr(m, "shared", 0))
            time.sleep(0.01)

    def __enter__(self) -> PeakSampler:
        self._t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._t.join()


def read_all(d: Path, setting: str) -> dict:
    """Runs in a fresh child so ru_maxrss covers reading only (not the checkpoint generation)."""
    base = psutil.Process().memory_info().rss
    total = 0
    checksum = 0.0
    with PeakSampler() as s:
        t0 = time.perf_counter()
        mo, _, rb = setting.partition(":")
        kw = {"max_open_shards": None if mo == "all" else int(mo)}
        if rb:
            kw["recycle_bytes"] = None if rb == "none" else parse_size(rb)
        with CheckpointReader(d, **kw) as r:
            for name in r.names():
                t = r.get(name)
                checksum += float(t.sum(dtype=torch.float32))
                total += t.numel() * t.element_size()
                del t
        wall = time.perf_counter() - t0
    return {"bytes": total, "wall": wall, "base_rss": base, "peak_rss": s.peak_rss, "peak_anon": s.peak_anon,
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "checksum": checksum}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="2GB", help="checkpoint size to generate (accelerate units: 2GB, 4GiB ...)")
    ap.add_argument("--side", type=int, default=4096, help="tensors are bf16 [side, side]")
    ap.add_argument("--shard-size", default="512MB", help="max shard size (accelerate units)")
    ap.add_argument("--dir", type=Path, help="reuse/create the checkpoint here instead of a temp dir")
    ap.add_argument("--settings", default="0,1,1:none,all:none",
                    help="comma list of CheckpointReader settings MAX_OPEN[:RECYCLE] to compare "
                         "('all' = keep every handle, RECYCLE 'none' = never reopen; default recycle 256 MiB)")
    ap.add_argument("--child-read", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--child-make", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child_make:
        make_checkpoint(args.child_make, parse_size(args.size, "--size"), args.side, parse_size(args.shard_size, "--shard-size"))
        return
    if args.child_read:
        print(json.dumps(read_all(args.child_read, args.settings)))
        return

    tmp = None if args.dir else tempfile.TemporaryDirectory(prefix="bench_read-")
    d = args.dir or Path(tmp.name)
    try:
        t0 = time.perf_counter()
        # in a child: Linux carries the parent's peak RSS into a spawned child's ru_maxrss
        subprocess.run([sys.executable, __file__, "--child-make", str(d), "--size", args.size,
                        "--side", str(args.side), "--shard-size", args.shard_size], check=True)
        gen = time.perf_counter() - t0
        shards = sorted(d.glob("*.safetensors"))
        size = sum(p.stat().st_size for p in shards)

        t0 = time.perf_counter()
        subprocess.run(["cat", *map(str, shards)], stdout=subprocess.DEVNULL, check=True)
        cat = time.perf_counter() - t0

        results = {}
        for mo in args.settings.split(","):
            out = subprocess.run([sys.executable, __file__, "--child-read", str(d), "--settings", mo],
                                 capture_output=True, text=True, check=True)
            results[mo] = json.loads(out.stdout.strip().splitlines()[-1])
    finally:
        if tmp:
            tmp.cleanup()

    mib = 2**20
    tensor_mib = args.side * args.side * 2 / mib
    print(f"checkpoint: {size / GB:.2f} GB in {len(shards)} shards, bf16 {args.side}x{args.side} "
          f"({tensor_mib:.0f} MiB/tensor); generated+written in {gen:.1f}s; page cache not dropped (warm)")
    print(f"{'measurement':<44}{'wall s':>8}{'GB/s':>7}{'peak RSS':>10}{'anon':>7}{'ru_maxrss':>10}  (MiB)")
    print(f"{'cat shards > /dev/null':<44}{cat:>8.2f}{size / GB / cat:>7.2f}")
    for mo, res in results.items():
        label = f"reader.get+sum 1-by-1, open:recycle={mo}"
        print(f"{label:<44}{res['wall']:>8.2f}{res['bytes'] / GB / res['wall']:>7.2f}{res['peak_rss'] / mib:>10.0f}"
              f"{res['peak_anon'] / mib:>7.0f}{res['ru_maxrss'] / mib:>10.0f}")
    base = next(iter(results.values()))["base_rss"]
    print(f"(child RSS after imports, before reading: {base / mib:.0f} MiB; RSS - anon = mmapped shard pages)")

if __name__ == "__main__":
    main()
