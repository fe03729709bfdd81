#!/usr/bin/env python
"""What each cut costs, data-free vs calibrated MoBE vs the baselines, on a trained model.

The model is tools/train_tiny_moe.py's trained Qwen3-MoE (trained once and cached; 4 MoE layers of
32 experts 96x256, top-4), trained on the first 8 MB of the Python standard library's sources.
Calibration text: the next 512 KB of those sources (never trained on). Held-out text: the
standard library's own test suite (Lib/test, excluded from training), 256 KB: neither trained on
nor calibrated on. Every configuration is a real `mobe-stream compress` run (same seed, steps,
solver), measured by `mobe-stream eval --reference <original> --json`: perplexity, its increase
over the original, KL(original || compressed) per token and top-1 agreement.

    python tools/bench_calib.py [--cuts 0.25,0.4,0.5] [--steps 1000] [--methods svd,molae,delta]
                                [--calib-rank 128] [--json out.json]
    python tools/bench_calib.py --table out.json      # the table of an earlier run

Prints a markdown table (the README's "What each cut costs" is this output).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))


def _cli(*args: str) -> str:
    r = subprocess.run([sys.executable, "-m", "mobe_stream", *args], capture_output=True, text=True, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"mobe-stream {' '.join(args)} failed:\n{r.stderr[-3000:]}")
    return r.stdout


def texts(work: Path, train_bytes: int) -> tuple[Path, Path]:
    """(calibration text, held-out text) files, both outside the training text."""
    from train_tiny_moe import stdlib_text

    calib = stdlib_text(train_bytes + 512 * 1024)[train_bytes:]
    root = Path(sysconfig.get_paths()["stdlib"]) / "test"
    parts, total = [], 0
    for f in sorted(root.glob("test_*.py")):
        t = f.read_text(encoding="utf-8", errors="replace")
        parts.append(t)
        total += len(t)
        if total >= 256 * 1024:
            break
    held = "\n".join(parts)[: 256 * 1024]
    (work / "calib.txt").write_text(calib)
    (work / "heldout.txt").write_text(held)
    return work / "calib.txt", work / "heldout.txt"


def evaluate(model: Path, original: Path, text: Path, ctx: int) -> dict:
    out = json.loads(_cli("eval", str(model), "--text", str(text), "--ctx", str(ctx), "--reference", str(original),
                          "--dtype", "float32", "--json"))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cuts", default="0.25,0.4,0.5")
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--methods", default="svd,molae,delta", help="baselines at the same budget ('' for none)")
    ap.add_argument("--calib-rank", type=int, default=None, help="default: the CLI's")
    ap.add_argument("--calib-damp", type=float, default=None)
    ap.add_argument("--calib-tokens", type=int, default=65536)
    ap.add_argument("--calib-ctx", type=int, default=256)
    ap.add_argument("--ctx", type=int, default=256, help="eval window")
    ap.add_argument("--variants", default="data-free,calibrated", help="MoBE variants")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--work", type=Path, default=None, help="keep outputs here (default: a temporary directory)")
    ap.add_argument("--table", type=Path, default=None, help="only print the table of an earlier run's --json")
    args = ap.parse_args()
    if args.table is not None:
        rows = json.loads(args.table.read_text())["rows"]
        print(table(rows, rows[0]["ppl"]))
        return

    from train_tiny_moe import DEFAULTS, cached_path

    original = cached_path(dict(DEFAULTS))
    if not (original / "config.json").exists():
        print("training the tiny model once (tools/train_tiny_moe.py) ...", file=sys.stderr)
        subprocess.run([sys.executable, str(ROOT / "tools" / "train_tiny_moe.py")], check=True)
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(tmp.name) if tmp is not None else args.work
    work.mkdir(parents=True, exist_ok=True)
    calib_txt, held_txt = texts(work, int(DEFAULTS["text_bytes"]))
    calib_opts = ["--calib", str(calib_txt), "--calib-tokens", str(args.calib_tokens), "--calib-ctx", str(args.calib_ctx)]
    if args.calib_rank is not None:
        calib_opts += ["--calib-rank", str(args.calib_rank)]
    if args.calib_damp is not None:
        calib_opts += ["--calib-damp", str(args.calib_damp)]

    base = evaluate(original, original, held_txt, args.ctx)
    rows = [{"cut": 0.0, "method": "original", "ppl": base["perplexity"], "kl": 0.0, "top1": 1.0, "seconds": 0.0,
             "expert_reduction": 0.0}]
    variants = [v for v in args.variants.split(",") if v]
    methods = [m for m in args.methods.split(",") if m]
    for cut in [float(c) for c in args.cuts.split(",")]:
        runs = [(f"MoBE {v}", ["--method", "mobe", "--steps", str(args.steps)] + (calib_opts if v == "calibrated" else []))
                for v in variants] + [(m, ["--method", m]) for m in methods]
        for label, opts in runs:
            out = work / f"{label.replace(' ', '-')}-{cut}"
            t0 = time.monotonic()
            summary = json.loads(_cli("compress", str(original), "--out", str(out), "--reduction", str(cut),
                                      "--overwrite", "--json", *opts))
            secs = time.monotonic() - t0
            ev = evaluate(out, original, held_txt, args.ctx)
            row = {"cut": cut, "method": label, "ppl": ev["perplexity"], "kl": ev["kl"],
                   "top1": ev["top1_agreement"], "seconds": secs,
                   "expert_reduction": summary["expert_reduction"]}
            rows.append(row)
            print(json.dumps(row), file=sys.stderr, flush=True)
    print(table(rows, base["perplexity"]))
    if args.json is not None:
        args.json.write_text(json.dumps({"rows": rows, "steps": args.steps, "calib": calib_opts[2:]}, indent=1))
    if tmp is not None:
        tmp.cleanup()


def table(rows: list[dict], base_ppl: float) -> str:
    lines = ["| expert cut | method | held-out ppl | ppl increase | KL to original | top-1 agreement |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        cut = "0 (original)" if r["method"] == "original" else f"{100 * r['expert_reduction']:.1f}%"
        inc = (r["ppl"] / base_ppl - 1) * 100
        lines.append(f"| {cut} | {r['method']} | {r['ppl']:.3f} | {inc:+.2f}% | {r['kl']:.4f} | {r['top1']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
