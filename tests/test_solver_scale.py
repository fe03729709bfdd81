"""The solver at true scale: targets kept as stored, matmul precision, memory plan, FLOPs, estimate."""

from __future__ import annotations

import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from mobe_stream.checkpoint import fp8
from mobe_stream.factorize import AdamSolver, AlternatingSolver, MoBESpec, Targets, relative_error, zscored
from mobe_stream.factorize.cost import plan_memory, step_flops
from mobe_stream.factorize.precision import Precision, round_to_tf32
from mobe_stream.pipeline.estimate import GPUS, estimate, target_bytes

from .helpers import run_cli

KIMI = dict(E=384, p=2048, d=7168)
KIMI_SPEC = MoBESpec(128, 2048, "silu", groups=2)


def _experts(E=8, p=256, d=384, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(2, p, d, generator=g) * 0.02
    return torch.stack([base[e % 2] + 0.01 * torch.randn(p, d, generator=g) for e in range(E)])


def test_fp8_targets_batch_is_the_format_dequantization():
    W = _experts(p=200, d=300)  # edge blocks in both dims
    q, s = fp8.quantize_stack(W)
    T = Targets(q, s)
    want = fp8.dequantize_stack(q, s, out_dtype=torch.float32)
    assert torch.equal(T.batch(), want) and torch.equal(T.batch(2, 5), want[2:5])
    assert torch.equal(T.take(torch.tensor([5, 1])).batch(), want[[5, 1]])
    assert T.nbytes == q.numel() + s.numel() * 4  # a quarter of fp32, plus the scales
    qa, sa = fp8.quantize_stack(_experts())  # whole blocks: the broadcast path
    assert torch.equal(Targets(qa, sa).batch(), fp8.dequantize_stack(qa, sa, out_dtype=torch.float32))
    for T2 in (T, Targets(qa, sa), Targets(W.to(torch.bfloat16)), Targets(W)):  # a bf16 step's batch: rounded once
        T2 = T2.scaled(0.37)
        assert torch.equal(T2.batch(1, 4, torch.bfloat16), T2.batch(1, 4).to(torch.bfloat16))


def test_zscored_targets_read_back_scaled_without_a_copy():
    W = _experts().to(torch.bfloat16)
    T, std = zscored(W)
    ref = W.float()
    assert std == pytest.approx(float(ref.std()), rel=1e-5)
    assert T.data.data_ptr() == W.data_ptr() and T.dtype == torch.bfloat16
    torch.testing.assert_close(T.batch(), ref / std, rtol=1e-6, atol=1e-7)
    assert T.mean_square() == pytest.approx(float(((ref / std) ** 2).mean()), rel=1e-5)
    assert T.first_nonfinite() is None and len(T._raw) == 1  # one pass served all three
    bad = W.clone()
    bad[5, 3, 7] = float("inf")
    assert Targets(bad).first_nonfinite() == 5


def test_solver_on_fp8_targets_keeps_them_as_stored_and_equals_the_fp32_run():
    W = _experts()
    q, s = fp8.quantize_stack(W)
    T8, std = zscored(Targets(q, s))
    T32 = Targets(T8.batch())  # the same values, held as fp32
    spec = MoBESpec(4, 64)
    a = AlternatingSolver(T8, spec, init="paper", expert_batch=3)
    b = AlternatingSolver(T32, spec, init="paper", expert_batch=3)
    assert a.T.dtype == fp8.FP8_DTYPE and a.T.nbytes < T32.nbytes // 3
    a.run(6)
    b.run(6)
    assert a.best_loss == b.best_loss and torch.equal(a.best["B"], b.best["B"])


def test_tf32_rounding_keeps_ten_mantissa_bits_round_to_nearest_even():
    x = torch.randn(10_000) * 1e3
    r = round_to_tf32(x)
    assert bool(((r.view(torch.int32) & 0x1FFF) == 0).all())
    assert bool(((r - x).abs() <= x.abs() * 2.0**-11).all())
    tie = torch.tensor([1 + 2.0**-11, 1 + 3 * 2.0**-11])  # exactly halfway: to the even neighbour
    assert round_to_tf32(tie).tolist() == [1.0, 1 + 4 * 2.0**-11]
    assert round_to_tf32(torch.tensor([float("inf"), float("nan")])).isfinite().sum() == 0


@pytest.mark.parametrize("cls", [AdamSolver, AlternatingSolver])
@pytest.mark.parametrize("precision", ["tf32", "bf16"])
def test_narrow_precision_changes_the_arithmetic_not_the_fit(cls, precision):
    W, _ = zscored(_experts(p=64, d=96))
    spec = MoBESpec(4, 64)
    ref, low = cls(W, spec, init="paper"), cls(W, spec, init="paper", precision=precision)
    ref.run(30)
    low.run(30)
    assert low.best_loss != ref.best_loss  # the flag reaches the matmuls
    assert low.best_loss == pytest.approx(ref.best_loss, rel=0.05)
    assert relative_error(W, low.best_factors()) == pytest.approx(ref.best_loss ** 0.5, rel=0.05)


def test_precision_rejects_unknown_names():
    with pytest.raises(ValueError, match="fp64"):
        Precision("fp64")


def test_kimi_projection_fits_an_80gb_card_with_no_pcie_traffic_under_als():
    tb = target_bytes(**KIMI, stored_dtype=fp8.FP8_DTYPE, block=(128, 128))
    assert tb == 384 * (2048 * 7168 + 16 * 56 * 4)
    budget = int(80e9 * 0.9)
    als = plan_memory("als", **KIMI, spec=KIMI_SPEC, target_bytes=tb, device_type="cuda", budget=budget)
    assert als.resident and als.pcie_bytes_per_step == 0 and als.device_bytes <= budget and als.batch >= 8
    adam = plan_memory("adam", **KIMI, spec=KIMI_SPEC, target_bytes=tb, device_type="cuda", budget=budget)
    assert not adam.resident and adam.pcie_bytes_per_step > 4 * 384 * 2048 * 2048 * 4  # A and moments, in and out
    l40s = plan_memory("als", **KIMI, spec=KIMI_SPEC, target_bytes=tb, device_type="cuda", budget=int(48e9 * 0.9))
    assert not l40s.resident and tb <= l40s.pcie_bytes_per_step < tb + 2**20 and l40s.device_bytes <= 48e9 * 0.9


@pytest.mark.parametrize("kind,cls", [("adam", AdamSolver), ("als", AlternatingSolver)])
def test_step_flops_formula_counts_the_real_matmuls(kind, cls):
    E, p, d = 6, 32, 48
    spec = MoBESpec(4, 24, groups=2)
    s = cls(_experts(E, p, d), spec, init="paper")
    with FlopCounterMode(display=False) as counter:
        s.step()
    counted = counter.get_total_flops()
    want = step_flops(kind, E, p, d, spec)
    r = spec.rank
    if kind == "als":  # the counter does not see the Cholesky factorisation and solves
        want -= E * r**3 // 3 + 2 * E * r * r * p
    assert counted == pytest.approx(want, rel=0.02)


def test_estimate_is_roofline_over_the_same_plan():
    tb = target_bytes(**KIMI, stored_dtype=fp8.FP8_DTYPE, block=(128, 128))
    h100 = estimate(**KIMI, spec=KIMI_SPEC, solver="als", precision="bf16", steps=1000, projections=120, targets=tb,
                    device="h100")
    fp32 = estimate(**KIMI, spec=KIMI_SPEC, solver="als", precision="fp32", steps=1000, projections=120, targets=tb,
                    device="h100")
    assert h100.resident and h100.pcie_bytes_per_step == 0
    assert h100.flops_per_step == step_flops("als", **KIMI, spec=KIMI_SPEC)
    assert fp32.step_seconds > 4 * h100.step_seconds  # 67 vs 989 TFLOP/s dominates
    assert h100.hours == pytest.approx(120 * (1000 * h100.step_seconds + h100.init_seconds) / 3600)
    adam = estimate(**KIMI, spec=KIMI_SPEC, solver="adam", precision="bf16", steps=1000, projections=120, targets=tb,
                    device="h100")
    assert adam.pcie_bytes_per_step > 0 and adam.step_seconds > adam.pcie_bytes_per_step / GPUS["h100"].pcie


def test_inspect_estimate_json_on_header_true_kimi(tmp_path):
    from mobe_stream.synth.true_shape import make_true_shape

    try:
        kimi = make_true_shape(tmp_path / "kimi", "kimi_k2", sparse=True)
    except ValueError as e:
        pytest.skip(f"filesystem without sparse files: {e}")
    proc = run_cli("inspect", str(kimi), "--estimate", "--gpu", "h100", "--solver", "als", "--num-bases", "128",
                   "--groups", "2", "--json", check=True, timeout=300)
    est = json.loads(proc.stdout)["estimate"]
    for key in ("hours", "step_seconds", "flops_per_step", "device_bytes", "pcie_bytes_per_step", "batch"):
        assert est[key] > 0 or key == "pcie_bytes_per_step"
    assert est["pcie_bytes_per_step"] == 0 and est["device_bytes"] <= 80e9 * 0.9 and est["projections"] == 120
    assert est["flops_per_step"] == step_flops("als", **KIMI, spec=KIMI_SPEC)
    table = run_cli("inspect", str(kimi), "--estimate", "--gpu", "a100-80g", "--num-bases", "128", "--groups", "2",
                    check=True, timeout=300)
    assert "estimate for" in table.stdout and "a100-80g" in table.stdout


@pytest.mark.parametrize("act", ["silu", "tanh", "gelu", "identity"])
def test_handwritten_als_backward_equals_autograd(act):
    W, _ = zscored(_experts(E=8, p=24, d=40))
    s = AlternatingSolver(W, MoBESpec(4, 16, act, groups=2), init="paper")
    idx = range(2, 7)  # straddles the two groups
    Wb = W.batch(idx.start, idx.stop)
    alpha = torch.randn(5, 2, dtype=torch.float64).float()
    B = s.params["B"] + 0.1 * torch.randn_like(s.params["B"])

    def leaves():
        return alpha.clone().requires_grad_(True), B.clone().requires_grad_(True)

    a1, b1 = leaves()
    ref = s._batch_loss(Wb.clone(), {"alpha": a1}, b1, idx)
    (ref / s.N).backward()
    a2, b2 = leaves()
    loss = s._batch_backward(Wb.clone(), {"alpha": a2}, b2, idx)
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(a2.grad, a1.grad, rtol=1e-4, atol=1e-8)
    torch.testing.assert_close(b2.grad, b1.grad, rtol=1e-4, atol=1e-8)


def test_scaled_init_sets_basis_rms_and_logits_and_solves_A():
    from mobe_stream.factorize import init_grouped_svd, init_scaled, solve_A
    from mobe_stream.factorize.init import BASIS_RMS, OWN_LOGIT
    from mobe_stream.factorize.model import mixed_bases

    W, _ = zscored(_experts(E=8, p=24, d=40))
    spec = MoBESpec(4, 16, groups=2)
    paper, f = init_grouped_svd(W, spec), init_scaled(W, spec)
    rms = f.B.pow(2).mean(dim=(2, 3)).sqrt()
    torch.testing.assert_close(rms, torch.full_like(rms, BASIS_RMS))
    assert torch.equal(f.alpha, paper.alpha * OWN_LOGIT)
    assert torch.allclose(f.B / rms[..., None, None], paper.B / paper.B.pow(2).mean(dim=(2, 3), keepdim=True).sqrt())
    M = mixed_bases(f.alpha, f.B, range(8), 8, "silu")
    torch.testing.assert_close(f.A, solve_A(W.batch(), M))
    lean = init_scaled(W, spec, need_A=False)
    assert lean.A.stride() == (0, 0, 0) and torch.equal(lean.B, f.B)  # no A memory for the als solver


def test_bf16_bmm_rounds_operands_and_gradients_keeps_fp32_output():
    a = torch.randn(3, 5, 7, requires_grad=True)
    b = torch.randn(3, 7, 4, requires_grad=True)
    out = Precision("bf16").bmm(a, b)
    r = lambda t: t.detach().to(torch.bfloat16).to(torch.float32)  # noqa: E731
    assert out.dtype == torch.float32 and torch.allclose(out, torch.bmm(r(a), r(b)), rtol=1e-6, atol=1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    torch.testing.assert_close(a.grad, torch.bmm(r(g), r(b).transpose(1, 2)), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(b.grad, torch.bmm(r(a).transpose(1, 2), r(g)), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("calibrated", [False, True])
def test_bf16_step_holds_its_intermediates_in_bf16_and_follows_the_fp32_gradient(calibrated):
    """Under bf16 the hand-written step's batch, mixed basis, residual and gradients are bf16
    tensors (half the memory traffic), a calibrated fit's too; loss and gradients stay those of the
    fp32 definition up to bf16 rounding."""
    from mobe_stream.factorize.metric import InputMetric

    W, _ = zscored(_experts(E=8, p=24, d=40))
    spec = MoBESpec(4, 16, "silu", groups=2)
    g = torch.Generator().manual_seed(3)
    H = InputMetric(torch.rand(8, 40, generator=g) + 0.5, torch.randn(8, 40, 3, generator=g) * 0.5) if calibrated else None
    s = AlternatingSolver(W, spec, init="paper", precision="bf16", metric=H)
    ref = AlternatingSolver(W, spec, init="paper", metric=H)
    idx = range(2, 7)  # straddles the two groups
    batch = s._targets({"W": W.data[idx.start:idx.stop]})
    assert batch.dtype == torch.bfloat16 and ref._targets({"W": W.data[2:7]}).dtype == torch.float32
    alpha = torch.randn(5, 2, generator=torch.Generator().manual_seed(1))
    B = s.params["B"] + 0.1 * torch.randn(s.params["B"].shape, generator=torch.Generator().manual_seed(2))
    a1, b1 = alpha.clone().requires_grad_(True), B.clone().requires_grad_(True)
    want = ref._batch_loss(W.batch(2, 7), {"alpha": a1}, b1, idx)
    (want / ref.N).backward()
    a2, b2 = alpha.clone().requires_grad_(True), B.clone().requires_grad_(True)
    loss = s._batch_backward(batch, {"alpha": a2}, b2, idx)
    assert batch.dtype == torch.bfloat16  # the residual overwrote the bf16 batch
    assert s._basis_operand(b2).dtype == torch.bfloat16 and s._basis_operand(b2) is s._basis_operand(b2)
    assert loss.dtype == torch.float32 and float(loss) == pytest.approx(float(want.detach()), rel=2e-2)
    for got, exp in ((a2.grad, a1.grad), (b2.grad, b1.grad)):
        assert got.dtype == torch.float32
        assert float((got - exp).norm() / exp.norm()) < 3e-2


def test_precision_products_round_operands_once_and_accumulate_in_fp32():
    g = torch.Generator().manual_seed(0)
    W, A, M = torch.randn(3, 6, 20, generator=g), torch.randn(3, 6, 5, generator=g), torch.randn(3, 5, 20, generator=g)
    bf = Precision("bf16")
    r16 = lambda t: t.to(torch.bfloat16).float()  # noqa: E731
    exact = r16(W) - torch.bmm(r16(A), r16(M))
    R = bf.residual_(W.to(torch.bfloat16), A, M.to(torch.bfloat16))
    assert R.dtype == torch.bfloat16 and torch.equal(R, exact.to(torch.bfloat16))  # rounded once, at the end
    out = bf.product(bf.operand(A), bf.operand(M), torch.bfloat16)
    assert out.dtype == torch.bfloat16 and torch.equal(out, torch.bmm(r16(A), r16(M)).to(torch.bfloat16))
    C = torch.randn(5, 20, generator=g)
    a, b = torch.randn(5, 7, generator=g), torch.randn(7, 20, generator=g)
    want = C + r16(a) @ r16(b)
    got = bf.accumulate_(C.clone(), bf.operand(a), bf.operand(b))
    assert got.dtype == torch.float32 and torch.allclose(got, want, rtol=1e-6, atol=1e-6)
    fp32 = Precision("fp32")  # fp32: operands as they are, the old arithmetic
    assert fp32.operand(A) is A and fp32.work_dtype == torch.float32
    assert torch.equal(fp32.residual_(W.clone(), A, M), W - torch.bmm(A, M))


def test_fused_adam_update_is_the_textbook_one_with_per_slice_steps():
    from mobe_stream.factorize.solver_base import BETAS, EPS, _adam_

    g0 = torch.Generator().manual_seed(0)
    p, m, v = torch.randn(3, 4, 5, generator=g0), torch.zeros(3, 4, 5), torch.zeros(3, 4, 5)
    want_p, want_m, want_v = p.clone(), m.clone(), v.clone()
    scale = torch.tensor([1.0, 2.0, 0.5]).view(3, 1, 1)
    b1, b2 = BETAS
    for t in (1, 2, 3):
        g = torch.randn(3, 4, 5, generator=g0)
        _adam_(p, g, m, v, 0.01, t, scale)
        want_m = b1 * want_m + (1 - b1) * g
        want_v = b2 * want_v + (1 - b2) * g * g
        step = 0.01 * scale / (1 - b1**t) * want_m / ((want_v / (1 - b2**t)).sqrt() + EPS)
        want_p = want_p - step
        torch.testing.assert_close(p, want_p, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(m, want_m)
        torch.testing.assert_close(v, want_v)


def test_bf16_plan_takes_bigger_batches_and_moves_fewer_bytes():
    from mobe_stream.factorize.cost import step_traffic_bytes

    tb = target_bytes(**KIMI, stored_dtype=fp8.FP8_DTYPE, block=(128, 128))
    budget = int(80e9 * 0.9)
    plans = {prec: plan_memory("als", **KIMI, spec=KIMI_SPEC, target_bytes=tb, device_type="cuda", budget=budget,
                               precision=prec) for prec in ("fp32", "bf16")}
    assert all(pl.resident and pl.device_bytes <= budget for pl in plans.values())
    assert plans["bf16"].batch > 1.5 * plans["fp32"].batch  # half-width temporaries, one bf16 copy of B
    traffic = {prec: step_traffic_bytes("als", **KIMI, spec=KIMI_SPEC, target_elem_bytes=tb / (384 * 2048 * 7168),
                                        precision=prec, batch=plans[prec].batch) for prec in plans}
    assert traffic["bf16"] < 0.7 * traffic["fp32"]
    # a calibrated fit's step is bf16 too: narrower temporaries than its fp32 step, though its
    # residual holds [M; M] and A's two parts (residual_split_), one product more
    from mobe_stream.factorize.cost import batch_bytes_per_expert
    calib = {prec: batch_bytes_per_expert("als", 2048, 7168, 2048, 128, prec) for prec in ("fp32", "bf16")}
    assert calib["bf16"] < 0.75 * calib["fp32"]
    assert calib["bf16"] >= batch_bytes_per_expert("als", 2048, 7168, 2048, None, "bf16") + 4 * 2048 * 7168
    extra = step_flops("als", **KIMI, spec=KIMI_SPEC, metric_rank=128, precision="bf16") \
        - step_flops("als", **KIMI, spec=KIMI_SPEC, metric_rank=128, precision="fp32")
    assert extra == 2 * 384 * 2048 * 2048 * 7168


def test_bf16_products_cuda_calls_bind_with_this_torch():
    """The CUDA branch of the bf16 products (out_dtype matmuls, the GEMM-epilogue residual, the
    in-place fp32 accumulation) run on meta tensors: CI has no GPU, but a signature this torch
    lacks fails here rather than on a user's first GPU run."""
    bf = Precision("bf16", "meta")
    meta = dict(device="meta")
    A, M = torch.empty(2, 4, 5, **meta), torch.empty(2, 5, 6, dtype=torch.bfloat16, **meta)
    W = torch.empty(2, 4, 6, dtype=torch.bfloat16, **meta)
    assert bf.residual_(W, A, M).dtype == torch.bfloat16
    assert bf.residual_split_(W, A, M).dtype == torch.bfloat16
    assert bf.product(bf.operand(A), M).dtype == torch.float32
    assert bf.product(bf.operand(A), M, torch.bfloat16).dtype == torch.bfloat16
    assert bf.product(M[0], M[0].T).shape == (5, 5)
    C = torch.empty(4, 6, **meta)
    assert bf.accumulate_(C, bf.operand(torch.empty(4, 3, **meta)), torch.empty(3, 6, dtype=torch.bfloat16, **meta)) is C
    assert bf.bmm(A, M.float()).dtype == torch.float32


@pytest.mark.parametrize("calib", [None, 4])
def test_prepared_gpu_step_check_runs_at_toy_scale_on_cpu(tmp_path, calib):
    """tools/bench_gpu_step.py is the one-call device check for when a GPU is lent: kept working here,
    data-free and calibrated (bf16: the split residual's path)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    tool = Path(__file__).resolve().parents[1] / "tools" / "bench_gpu_step.py"
    extra = [] if calib is None else ["--calib-rank", str(calib)]
    proc = subprocess.run([sys.executable, str(tool), "--experts", "8", "--p", "64", "--d", "256", "--num-bases", "4",
                           "--groups", "2", "--steps", "3", "--device", "cpu", *extra], capture_output=True, text=True,
                          timeout=300, env={**os.environ, "OUT": str(tmp_path)})
    assert proc.returncode == 0, proc.stderr
    out = json.loads((tmp_path / "bench_gpu_step.json").read_text())
    assert out == json.loads(proc.stdout)
    assert out["shape"] == [8, 64, 256] and out["step_seconds"] > 0 and out["init_svd_shape"] == [2 * 64, 256]
    assert out["loss_last"] < out["loss_first"]  # the steps fit something
    assert out["calib_rank"] == calib
    assert out["flops_per_step"] == step_flops("als", 8, 64, 256, MoBESpec(4, 64, "silu", groups=2), calib, "bf16")
    assert out["estimate_batch"] == out["batch"] and out["measured_over_estimate"] > 0
