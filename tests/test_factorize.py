"""MoBE factorization: formula, init, solvers (batched == unbatched, exact resume), budgets."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mobe_stream.factorize import (
    AdamSolver,
    AlternatingSolver,
    MoBEFactors,
    MoBESpec,
    choose_bases_rank,
    expert_cut,
    init_fitted,
    init_grouped_svd,
    mixed_bases,
    param_fraction,
    prepare_targets,
    relative_error,
    solve_A,
    working_set_bytes,
)

SOLVERS = [AdamSolver, AlternatingSolver]


def _experts(E=16, p=24, d=40, clusters=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    C = torch.randn(clusters, p, d, generator=g)
    return torch.stack([C[e * clusters // E] + 0.3 * torch.randn(p, 3, generator=g) @ torch.randn(3, d, generator=g)
                        + 0.05 * torch.randn(p, d, generator=g) for e in range(E)])


def test_reconstruct_matches_formula_written_out():
    torch.manual_seed(0)
    E, p, d, G, mg, r = 6, 5, 7, 2, 3, 4
    f = MoBEFactors(torch.randn(E, p, r), torch.randn(G, mg, r, d), torch.randn(E, mg), 1.7, "tanh")
    W = f.reconstruct()
    for e in range(E):
        g = e // (E // G)
        w = torch.softmax(f.alpha[e], 0)
        M = torch.tanh(sum(w[i] * f.B[g, i] for i in range(mg)))
        torch.testing.assert_close(W[e], 1.7 * f.A[e] @ M, rtol=1e-5, atol=1e-5)
    assert torch.allclose(f.reconstruct(torch.tensor([4]), activation="silu")[0],
                          1.7 * f.A[4] @ F.silu(torch.softmax(f.alpha[4], 0) @ f.B[1].reshape(mg, -1)).reshape(r, d), atol=1e-5)


def test_prepare_targets_zscores_in_place():
    W = _experts() * 3
    Ws, std = prepare_targets(W)
    assert Ws.data_ptr() == W.data_ptr() and abs(float(Ws.std()) - 1) < 1e-5 and std > 1


@pytest.mark.parametrize("groups", [1, 2])
def test_init_grouped_svd_shapes_and_one_hot(groups):
    W, _ = prepare_targets(_experts())
    spec = MoBESpec(num_bases=4, rank=24, activation="silu", groups=groups)
    f = init_grouped_svd(W, spec)
    assert f.A.shape == (16, 24, 24) and f.B.shape == (groups, 4 // groups, 24, 40) and f.alpha.shape == (16, 4 // groups)
    assert torch.equal(f.alpha.sum(1), torch.ones(16)) and set(f.alpha.unique().tolist()) == {0.0, 1.0}
    assert relative_error(W, f) < 1.0


@pytest.mark.parametrize("cls", SOLVERS)
def test_solver_reduces_error_and_keeps_best(cls):
    W, _ = prepare_targets(_experts())
    s = cls(W, MoBESpec(4, 16))
    e0 = relative_error(W, s.best_factors())
    losses = []
    s.run(60, callback=lambda step, loss, best: losses.append((step, loss, best)), report_every=10)
    assert [x[0] for x in losses] == [10, 20, 30, 40, 50, 60]
    e1 = relative_error(W, s.best_factors())
    assert e1 < 0.8 * e0
    assert s.best_loss == min(s.history + [s.best_loss])
    # the best iterate is the one whose loss was recorded: its MSE equals best_loss
    f = s.best_factors()
    assert float(((f.reconstruct() - W) ** 2).mean()) == pytest.approx(s.best_loss, rel=1e-4)


@pytest.mark.parametrize("cls", SOLVERS)
def test_expert_batches_match_all_at_once(cls):
    W, _ = prepare_targets(_experts())
    spec = MoBESpec(4, 16, groups=2)
    a, b = cls(W, spec), cls(W, spec, expert_batch=3)
    assert b.batch == 3 and a.batch == 16
    a.run(25)
    b.run(25)
    fa, fb = a.best_factors(), b.best_factors()
    assert a.best_step == b.best_step and b.best_loss == pytest.approx(a.best_loss, rel=1e-5)
    if cls is AdamSolver:  # ALS re-solves A from (B, α): rounding differences are amplified a little more
        torch.testing.assert_close(fb.B, fa.B, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fb.reconstruct(), fa.reconstruct(), rtol=1e-3, atol=2e-3)


def test_max_device_bytes_chooses_batches():
    W, _ = prepare_targets(_experts())
    s = AdamSolver(W, MoBESpec(4, 16), max_device_bytes=200_000)
    assert 1 <= s.batch < 16


@pytest.mark.parametrize("cls,init", [(AdamSolver, "paper"), (AlternatingSolver, "paper"), (AdamSolver, "fitted"),
                                      (AlternatingSolver, "clustered")])
def test_stop_save_load_continue_is_bit_identical(cls, init):
    W, _ = prepare_targets(_experts())
    spec = MoBESpec(4, 16)
    ref = cls(W, spec, expert_batch=5, init=init)
    ref.run(30)
    first = cls(W, spec, expert_batch=5, init=init)
    first.run(30, should_stop=lambda: first.step_count >= 11)
    assert first.step_count == 11
    tensors, meta = first.state_dict()
    import json

    meta = json.loads(json.dumps(meta))  # what the checkpoint file stores
    second = cls(W, spec, expert_batch=5, init=init)
    second.load_state_dict({k: v.clone() for k, v in tensors.items()}, meta)
    second.run(30 - second.step_count)
    fa, fb = ref.best_factors(), second.best_factors()
    assert torch.equal(fa.A, fb.A) and torch.equal(fa.B, fb.B) and torch.equal(fa.alpha, fb.alpha)
    assert ref.best_loss == second.best_loss


@pytest.mark.parametrize("act", ["silu", "tanh"])
def test_fitted_init_is_closer_and_its_A_is_least_squares(act):
    W, _ = prepare_targets(_experts())
    spec = MoBESpec(4, 16, act)
    paper, fitted = init_grouped_svd(W, spec), init_fitted(W, spec)
    assert torch.equal(fitted.B, paper.B / (0.5 if act == "silu" else 1.0))
    assert relative_error(W, fitted) < 0.8 * relative_error(W, paper)
    A = fitted.A.clone().requires_grad_(True)
    M = mixed_bases(fitted.alpha, fitted.B, range(16), 16, act)
    ((W - A @ M) ** 2).sum().backward()
    assert A.grad.abs().max() < 1e-3 * (W.abs().max() * M.abs().max() * W.shape[-1])
    with pytest.raises(ValueError, match="unknown init"):
        AdamSolver(W, spec, init="random")


def test_tol_stops_early():
    W, _ = prepare_targets(_experts())
    s = AlternatingSolver(W, MoBESpec(4, 16), tol=0.5, patience=5)
    s.run(500)
    assert s.converged and s.step_count < 500


def test_solve_A_is_least_squares():
    torch.manual_seed(0)
    W, M = torch.randn(3, 6, 20), torch.randn(3, 4, 20)
    A = solve_A(W, M)
    ref = torch.linalg.lstsq(M.transpose(1, 2), W.transpose(1, 2)).solution.transpose(1, 2)
    torch.testing.assert_close(A, ref, rtol=1e-3, atol=1e-4)


def test_choose_bases_rank():
    m, r = choose_bases_rank(384, 2048, 7168, 0.25)
    assert r == 2048 and expert_cut(384, 2048, 7168, m, r) >= 0.25 and expert_cut(384, 2048, 7168, m + 1, r) < 0.25
    m, r = choose_bases_rank(128, 1536, 4096, 0.25, groups=2)
    assert m % 2 == 0 and expert_cut(128, 1536, 4096, m, r) >= 0.25
    m, r = choose_bases_rank(8, 32, 64, 0.5)
    assert r < 32 and expert_cut(8, 32, 64, m, r) >= 0.5
    with pytest.raises(ValueError, match="cannot cut"):
        choose_bases_rank(8, 32, 64, 0.6, rank=32)
    with pytest.raises(ValueError):
        choose_bases_rank(8, 32, 64, 1.5)
    with pytest.raises(ValueError):
        MoBESpec(num_bases=3, rank=4, groups=2)


@pytest.mark.parametrize("cls", SOLVERS)
def test_device_side_best_tracking_matches_host(cls):
    """The sync-free bookkeeping used on CUDA (torch.where on the device) picks the same iterate."""
    W, _ = prepare_targets(_experts())
    spec = MoBESpec(4, 16)
    host, dev = cls(W, spec, lr=0.3), cls(W, spec, lr=0.3)  # a large lr makes some steps worse
    dev.sync_each_step = False
    host.run(25)
    seen = []
    dev.run(25, callback=lambda s, loss, best: seen.append(s), report_every=10)
    assert seen == [10, 20, 25] and host.best_step == dev.best_step and host.best_loss == dev.best_loss
    fa, fb = host.best_factors(), dev.best_factors()
    assert torch.equal(fa.A, fb.A) and torch.equal(fa.B, fb.B) and torch.equal(fa.alpha, fb.alpha)


def test_init_pads_bases_when_rank_exceeds_data():
    W, _ = prepare_targets(_experts(E=8, p=6, d=40))
    f = init_grouped_svd(W, MoBESpec(4, 16))  # each sub-group stacks 2*6 = 12 rows < 16
    assert torch.equal(f.B[:, :, 12:], torch.zeros_like(f.B[:, :, 12:]))
    assert torch.equal(f.A[..., 12:], torch.zeros_like(f.A[..., 12:]))
    # with exact (unsquashed) bases the init would reproduce each sub-group; silu + soft weights keep it < 1
    assert relative_error(W, f) < 1.0


def test_groups_use_only_their_own_bases():
    W, _ = prepare_targets(_experts())
    s = AdamSolver(W, MoBESpec(4, 16, groups=2))
    s.run(5)
    f = s.best_factors()
    before = f.reconstruct(torch.arange(8, 16))
    f.B[0].add_(1.0)  # group 0's bases must not influence experts 8..15
    assert torch.equal(f.reconstruct(torch.arange(8, 16)), before)


def test_param_fraction_and_working_set():
    assert param_fraction(256, 2048, 7168, 64, 2048) == pytest.approx(
        1 / 3 + 2 * 2048 / (3 * 7168) + 2 * 64 * 2048 / (3 * 256 * 2048))
    ws = working_set_bytes(16, 32, 48, 4, 32)
    assert ws["host"] >= 4 * 16 * 32 * 48 and ws["device"] > 0
