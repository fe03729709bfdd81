"""Calibrated MoBE (--calib): input metrics, the weighted objective, the calibration forward, the unit."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import torch

from mobe_stream.factorize import AdamSolver, AlternatingSolver, InputMetric, MoBESpec, expert_metrics, solve_A, zscored
from mobe_stream.factorize.metric import low_rank_plus_diag
from mobe_stream.pipeline import calib
from mobe_stream.pipeline.compress import compress
from mobe_stream.pipeline.journal import Journal
from mobe_stream.pipeline.options import CompressOptions
from mobe_stream.runtime import calibrate
from mobe_stream.synth import make_tiny_moe

from .helpers import REPO, all_tensors, run_cli

SPEC = MoBESpec(num_bases=4, rank=6, activation="silu")


def _blended(X: torch.Tensor, rows: torch.Tensor, prior: float, damp: float) -> torch.Tensor:
    """The metric's definition, written out with dense d x d matrices."""
    n, d = X.shape
    pooled = X.T @ X / n
    pooled = pooled / pooled.diagonal().mean()
    c = rows.shape[0]
    own = rows.T @ rows / max(c, 1)
    scale = own.diagonal().mean() if c else torch.tensor(1.0)
    H = (c * own + prior * scale * pooled) / (c + prior)
    mean = H.diagonal().mean()
    H = H + damp * mean * torch.eye(d, dtype=H.dtype)
    return H / H.diagonal().mean()


def test_metric_is_the_blended_second_moment_when_the_rank_covers_it():
    torch.manual_seed(0)
    n, d, E = 400, 12, 6
    X = (torch.randn(n, d) @ torch.randn(d, d)).double()
    experts = torch.stack([torch.randperm(E)[:2] for _ in range(n)])
    experts[experts == 5] = 4  # expert 5 sees no token: it gets the pooled metric
    experts[:, 1] = torch.where(experts[:, 0] == experts[:, 1], (experts[:, 0] + 1) % 5, experts[:, 1])
    metric, counts = expert_metrics(X.float(), experts, E, k=d, damp=0.05, prior_tokens=16)
    assert int(counts[5]) == 0 and int(counts.sum()) == 2 * n
    for e in range(E):
        rows = X[(experts == e).any(dim=1)]
        want = _blended(X, rows, 16, 0.05)
        got = metric.V[e].double() @ metric.V[e].double().T + torch.diag(metric.diag[e].double())
        assert torch.allclose(got, want, atol=1e-4, rtol=1e-4), e
        assert abs(float(got.diagonal().mean()) - 1.0) < 1e-5  # normalised: experts weigh alike


def test_input_scales_weigh_each_routed_row():
    """Llama-4 scales the experts' inputs by the routing weight: the metric is over the scaled rows."""
    torch.manual_seed(1)
    n, d, E = 300, 10, 4
    X = (torch.randn(n, d) @ torch.randn(d, d)).double()
    experts = torch.randint(0, E, (n, 1))
    scales = torch.rand(n, 1) + 0.1
    metric, _ = expert_metrics(X.float(), experts, E, k=d, damp=0.05, prior_tokens=16, scales=scales)
    plain, _ = expert_metrics(X.float(), experts, E, k=d, damp=0.05, prior_tokens=16)
    Xs = X * scales.double()
    for e in range(E):
        rows = Xs[experts[:, 0] == e]
        got = metric.V[e].double() @ metric.V[e].double().T + torch.diag(metric.diag[e].double())
        assert torch.allclose(got, _blended(X, rows, 16, 0.05), atol=1e-4, rtol=1e-4), e
    full = metric.V @ metric.V.transpose(1, 2) + torch.diag_embed(metric.diag)
    assert not torch.allclose(full, plain.V @ plain.V.transpose(1, 2) + torch.diag_embed(plain.diag), atol=1e-3)


def test_low_rank_plus_diag_keeps_the_exact_diagonal_and_the_top_directions():
    torch.manual_seed(1)
    for n, d in ((5, 20), (50, 20)):  # through the n x n Gram and through the d x d one
        Y = torch.randn(n, d)
        h, V = low_rank_plus_diag(Y, None, 3, damp=0.0)
        H = (Y.T @ Y).double()
        H = H / H.diagonal().mean()
        approx = V.double() @ V.double().T + torch.diag(h.double())
        assert torch.allclose(approx.diagonal(), H.diagonal(), atol=1e-5)
        top = torch.linalg.eigvalsh(H)[-3:]
        assert torch.allclose(torch.linalg.eigvalsh(V.double() @ V.double().T)[-3:], top, rtol=1e-5, atol=1e-6)


def _metric(E: int, d: int, k: int, seed: int = 0) -> InputMetric:
    g = torch.Generator().manual_seed(seed)
    return InputMetric(torch.rand(E, d, generator=g) + 0.5, torch.randn(E, d, k, generator=g) * 0.5)


def test_weighted_solve_is_the_weighted_argmin():
    torch.manual_seed(2)
    W, M = torch.randn(3, 8, 10), torch.randn(3, 5, 10)
    H = _metric(3, 10, 4)
    A = solve_A(W, M, metric=H).requires_grad_(True)
    H.quadratic(W - torch.bmm(A, M)).backward()
    assert A.grad is not None and float(A.grad.abs().max()) < 1e-3
    dense = H.V @ H.V.transpose(1, 2) + torch.diag_embed(H.diag)
    R = torch.randn(3, 8, 10)
    assert torch.allclose(H.apply(R), R @ dense, atol=1e-4)
    assert torch.allclose(H.quadratic(R), torch.einsum("kpd,kde,kpe->", R, dense, R), rtol=1e-5)


def test_als_backward_by_hand_equals_autograd_with_a_metric():
    torch.manual_seed(3)
    E, p, d = 8, 12, 16
    W = torch.randn(E, p, d)
    s = AlternatingSolver(W, SPEC, metric=_metric(E, d, 5))
    grads = []
    for by_hand in (False, True):
        alpha = s.params["alpha"].clone().requires_grad_(True)
        B = s.params["B"].clone().requires_grad_(True)
        if by_hand:
            loss = s._batch_backward(W.clone(), {"alpha": alpha}, B, range(E))
        else:
            loss = s._batch_loss(W.clone(), {"alpha": alpha}, B, range(E))
            (loss / s.N).backward()
        grads.append((float(loss.detach()), B.grad.clone(), alpha.grad.clone()))
    (l0, b0, a0), (l1, b1, a1) = grads
    assert abs(l0 - l1) < 1e-4 * abs(l0)
    assert torch.allclose(b0, b1, rtol=1e-4, atol=1e-7) and torch.allclose(a0, a1, rtol=1e-4, atol=1e-8)


@pytest.mark.parametrize("cls", [AlternatingSolver, AdamSolver])
def test_identity_metric_is_the_data_free_fit(cls):
    torch.manual_seed(4)
    W = torch.randn(8, 12, 16)
    plain = cls(W, SPEC)
    plain.run(5)
    weighted = cls(W, SPEC, metric=InputMetric(torch.ones(8, 16), torch.zeros(8, 16, 0)))
    weighted.run(5)
    assert abs(plain.best_loss - weighted.best_loss) <= 1e-6 * plain.best_loss
    assert torch.allclose(plain.best_factors().B, weighted.best_factors().B, atol=1e-6)


def test_calibrated_fit_weighs_the_seen_directions():
    """With inputs confined to a subspace, the calibrated fit's output error on those inputs is
    smaller than the data-free fit's (what calibration is for)."""
    torch.manual_seed(5)
    E, p, d = 8, 12, 16
    W = torch.randn(E, p, d)
    basis = torch.linalg.qr(torch.randn(d, 4))[0]
    X = torch.randn(2000, 4) @ basis.T  # inputs live in a 4-dimensional subspace
    experts = torch.randint(0, E, (2000, 1))
    metric, _ = expert_metrics(X, experts, E, k=d, damp=0.001)
    out_err = []
    for H in (None, metric):
        s = AlternatingSolver(W, SPEC, metric=H)
        s.run(30)
        What = s.best_factors().reconstruct()
        out_err.append(float(((W - What) @ basis).pow(2).sum()))
    assert out_err[1] < 0.5 * out_err[0]


# ---- the calibration forward and the unit -----------------------------------------------------

def _text(path: Path) -> Path:
    t = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "decoder.py").read_text()
    path.write_text(t * 3)
    return path


def test_layer_major_forward_sees_what_the_runner_sees(tmp_path):
    from mobe_stream.runtime.model import load_model

    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    windows = calibrate.calibration_windows(src, _text(tmp_path / "c.txt"), 96, 32)
    assert windows.shape == (3, 32)
    got: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    calibrate.routed_inputs(src, windows, [1, 2], lambda i, h, X, e, s: got.__setitem__(i, (X, e)) if X is not None else None,
                            dtype="float32")
    model = load_model(src, dtype=torch.float32, device="cpu")
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    model.moe_probe = lambda x, e, s: seen.append((x.clone(), e.clone()))
    for w in windows:
        model(w[None])
    model.close()
    for j, layer in enumerate((1, 2)):  # the tiny qwen3_moe's MoE layers, in order, per window
        X = torch.cat([seen[k][0] for k in range(j, len(seen), 2)])
        e = torch.cat([seen[k][1] for k in range(j, len(seen), 2)])
        assert torch.allclose(got[layer][0], X, atol=1e-5) and torch.equal(got[layer][1], e)


class _Dies(Exception):
    pass


def _dying_runtime(after_layer: int, starts: list) -> calib.CalibRuntime:
    def routed_inputs(src, windows, layers, on_layer, start=None):
        starts.append(None if start is None else start[0])

        def wrapped(i, hidden, X, e, s=None):
            on_layer(i, hidden, X, e, s)
            if i == after_layer and after_layer >= 0:
                raise _Dies("killed")

        calibrate.routed_inputs(src, windows, layers, wrapped, start)
    return calib.CalibRuntime(calibrate.calibration_windows, routed_inputs)


def _opts(text: Path, **kw) -> CompressOptions:
    return CompressOptions(num_bases=4, rank=16, steps=4, checkpoint_every=1e9, calib=str(text), calib_tokens=256,
                           calib_ctx=32, calib_rank=8, **kw)


def test_calibration_unit_resumes_at_the_next_layer_bit_identically(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    text = _text(tmp_path / "c.txt")
    compress(src, tmp_path / "whole", _opts(text), calib_runtime=calibrate.RUNTIME)
    starts: list = []
    with pytest.raises(_Dies):
        compress(src, tmp_path / "cut", _opts(text), calib_runtime=_dying_runtime(1, starts))
    assert (tmp_path / "cut" / ".mobe-state" / "calib" / "layer-1.state.zst").exists()
    compress(src, tmp_path / "cut", _opts(text, resume=True), calib_runtime=_dying_runtime(-1, starts))
    assert starts == [None, 2]  # the resumed forward started after the layer that was finished
    a, b = all_tensors(tmp_path / "whole"), all_tensors(tmp_path / "cut")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not calib.state_dir(tmp_path / "cut").exists()  # removed once the run completed
    journal = Journal.load(tmp_path / "cut")
    assert journal is not None and journal.done(calib.UNIT)
    assert journal.data["settings"]["calib"]["rank"] == 8
    info = journal.units["layer.1.gate_proj"]["info"]
    assert 0 < info["rel_error_calib"] < 1


def test_calibrated_output_differs_from_data_free_and_runs(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="kimi_k2", fp8=True)  # FP8 source, sigmoid grouped routing
    text = _text(tmp_path / "c.txt")
    out = tmp_path / "cal"
    r = run_cli("compress", str(src), "--out", str(out), "--num-bases", "4", "--rank", "32", "--steps", "4", "--calib", str(text),
                "--calib-tokens", "256", "--calib-ctx", "32", "--calib-rank", "4", "--json")
    assert r.returncode == 0, r.stderr
    free = tmp_path / "free"
    assert run_cli("compress", str(src), "--out", str(free), "--num-bases", "4", "--rank", "32", "--steps", "4").returncode == 0
    a, b = all_tensors(out), all_tensors(free)
    assert a.keys() == b.keys()
    assert any(not torch.equal(a[k], b[k]) for k in a if "mobe" in k)
    short = tmp_path / "short.txt"
    short.write_text(text.read_text()[:2000])
    r = run_cli("eval", str(out), "--text", str(short), "--ctx", "32", "--reference", str(src), "--json")
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["kl"] >= 0


@pytest.mark.parametrize("args, message", [
    (["--calib", "{missing}"], "is not a file"),
    (["--calib", "{text}", "--method", "svd"], "--method mobe"),
    (["--calib", "{text}", "--calib-ctx", "1"], "--calib-ctx"),
])
def test_bad_calibration_options_are_one_line_errors(tmp_path, args, message):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    text = _text(tmp_path / "c.txt")
    args = [a.format(missing=tmp_path / "nope.txt", text=text) for a in args]
    r = run_cli("compress", str(src), "--out", str(tmp_path / "out"), *args)
    assert r.returncode == 2 and message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_inspect_estimates_the_calibrated_run(tmp_path):
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    cfg = json.loads((src / "config.json").read_text())
    base = ["inspect", str(src), "--estimate", "--gpu", "h100", "--json"]
    free = json.loads(run_cli(*base, check=True).stdout)["estimate"]
    cal = json.loads(run_cli(*base, "--calib-tokens", "4096", "--calib-rank", "8", check=True).stdout)["estimate"]
    assert "calib" not in free
    E, d = cfg["num_experts"], cfg["hidden_size"]
    assert cal["calib"]["metric_bytes_per_layer"] == E * d * 9 * 4
    assert cal["calib"]["tokens"] == 4096 and cal["calib"]["seconds"] > 0
    assert cal["flops_per_step"] > free["flops_per_step"] and cal["hours"] > free["hours"]
    # --precision auto: bf16 on a GPU, but fp32 for a calibrated fit (bf16 costs it 13-45% error)
    assert (free["precision"], cal["precision"]) == ("bf16", "fp32")


@pytest.mark.parametrize("device", ["cpu", "cuda", "cuda:1"])
def test_auto_precision_of_a_calibrated_fit_is_fp32_everywhere(device, tmp_path):
    from mobe_stream.pipeline.options import CompressOptions, resolve_precision

    assert resolve_precision("auto", device, calibrated=True) == "fp32"
    assert resolve_precision("bf16", device, calibrated=True) == "bf16"  # asked for: kept
    assert resolve_precision("auto", device) == ("fp32" if device == "cpu" else "bf16")
    if device == "cpu":  # (resolving a CUDA device needs one)
        assert CompressOptions(device=device, calib=str(tmp_path / "t.txt")).resolved_precision() == "fp32"
        assert CompressOptions(device=device, calib=str(tmp_path / "t.txt"), precision="bf16").resolved_precision() == "bf16"


@pytest.mark.skipif(sys.platform != "linux", reason="torchrun with gloo on Linux")
def test_two_ranks_calibrated_match_one_process(tmp_path):
    """One rank measures the calib unit while the other waits on the journal for it; the output is
    the single process's, bit for bit."""
    src = make_tiny_moe(tmp_path / "src", family="qwen3_moe")
    text = _text(tmp_path / "c.txt")
    args = ["--num-bases", "4", "--rank", "16", "--steps", "10", "--calib", str(text), "--calib-tokens", "512",
            "--calib-ctx", "32", "--calib-rank", "8"]
    run_cli("compress", str(src), "--out", str(tmp_path / "one"), *args, check=True, extra_env={"OMP_NUM_THREADS": "1"})
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port",
                           str(28500 + os.getpid() % 1000), "-m", "mobe_stream", "compress", str(src), "--out",
                           str(tmp_path / "two"), *args], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    one, two = all_tensors(tmp_path / "one"), all_tensors(tmp_path / "two")
    assert one.keys() == two.keys() and all(torch.equal(one[k], two[k]) for k in one)


def test_calibrated_bf16_fit_carries_a_in_two_parts():
    """A calibrated fit's A (weighted least squares against a metric with a weak diagonal) is large
    and cancels: rounded once to bf16, A·M misses W by as much as the fit's own error. The bf16
    step carries A as hi + lo bf16 parts in its residual (Precision.residual_split_), which keeps
    its fit near fp32's; with A rounded once it ends 2.5x above fp32 on this problem."""
    g = torch.Generator().manual_seed(0)
    E, p, d, k = 8, 24, 64, 6
    W, _ = zscored(torch.randn(E, p, d, generator=g) @ (torch.randn(d, d, generator=g) * torch.logspace(0, -1, d)))
    V = torch.randn(E, d, k, generator=g) * torch.logspace(0, -2, k)
    H = InputMetric(torch.full((E, d), 0.01), V * (d / V.pow(2).sum((1, 2), keepdim=True)).sqrt())
    errs = {}
    for prec in ("fp32", "bf16"):
        s = AlternatingSolver(W, MoBESpec(4, 24, "silu", 1), init="scaled", precision=prec, metric=H,
                              schedule="decay", total_steps=100)
        s.run(100)
        R = W.batch() - s.best_factors().reconstruct()
        errs[prec] = float(H.quadratic(R) / H.quadratic(W.batch())) ** 0.5
    assert errs["bf16"] < 1.8 * errs["fp32"]


def test_split_residual_is_exact_to_sixteen_bits_of_a():
    from mobe_stream.factorize.precision import Precision

    g = torch.Generator().manual_seed(1)
    M = torch.randn(2, 16, 32, generator=g).to(torch.bfloat16)
    A = torch.randn(2, 8, 16, generator=g) * 1e3  # large, as a weighted fit's A is
    W = (torch.bmm(A, M.float()) + torch.randn(2, 8, 32, generator=g)).to(torch.bfloat16)
    exact = W.double() - torch.bmm(A.double(), M.double())
    bf = Precision("bf16")
    narrow = bf.residual_(W.clone(), A, M).double()
    buf = W.clone()
    split = bf.residual_split_(buf, A, M)
    assert split.dtype == torch.bfloat16 and split.data_ptr() == buf.data_ptr()  # R in W's buffer, rounded once
    err_split, err_narrow = (split.double() - exact).abs().max(), (narrow - exact).abs().max()
    assert err_split < 0.05 * err_narrow
    assert torch.allclose(split.double(), exact, rtol=2**-7, atol=0.05)  # R's own bf16 rounding, and little else
    fp = Precision("fp32")  # an fp32 step's A is fp32 already: the plain residual
    W32 = W.float()
    assert torch.equal(fp.residual_split_(W32.clone(), A, M.float()), fp.residual_(W32.clone(), A, M.float()))


def test_cpu_estimate_probes_a_calibrated_step(monkeypatch):
    """On a CPU the estimate times one batch of a real step; a calibrated fit's probe carries a
    metric of its rank (R·H and the split residual were missing from it: its bf16 estimate was 61%
    under the measured step on the trained tiny model)."""
    from mobe_stream.pipeline import estimate as est
    from mobe_stream.pipeline import solvers

    seen = []

    class Spy(AlternatingSolver):
        def __init__(self, *a, metric=None, **kw):
            seen.append(metric)
            super().__init__(*a, metric=metric, **kw)

    monkeypatch.setitem(solvers.SOLVERS, "als", Spy)
    spec = MoBESpec(2, 8, "silu", 1)
    assert est.probe_cpu_batch("als", 8, 32, spec, 4, "bf16") > 0
    assert est.probe_cpu_batch("als", 8, 32, spec, 4, "bf16", metric_rank=6) > 0
    assert seen[0] is None and seen[1].rank == 6 and seen[1].num_experts == 4
    assert est.probe_cpu_batch("als", 8, 32, spec, 4, "fp32", metric_rank=64) > 0
    assert seen[2].rank == 32  # at most d
