"""The solvers' step-size policy (factorize/schedule.py): the decay of lr over a run, relative basis
steps, and both kept across a checkpoint."""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch

from mobe_stream.factorize import AdamSolver, AlternatingSolver, MoBEFactors, MoBESpec
from mobe_stream.factorize.schedule import BASIS_STEP_CAP, DECAY_FRACTION, basis_step_scale, lr_factor


def test_lr_factor_is_constant_then_decays_linearly_to_the_last_step():
    assert [lr_factor("constant", t, 10) for t in (1, 10, 50)] == [1.0, 1.0, 1.0]
    assert lr_factor("decay", 7, None) == 1.0  # no known length: nothing to decay towards
    total = 100
    f = [lr_factor("decay", t, total) for t in range(1, total + 1)]
    stable = int(total * (1 - DECAY_FRACTION))
    assert all(x == 1.0 for x in f[:stable + 1])
    assert all(a > b for a, b in pairwise(f[stable:]))  # strictly down to the end
    assert f[-1] == pytest.approx(1 / (DECAY_FRACTION * total)) and f[-1] > 0
    assert lr_factor("decay", total + 5, total) == f[-1]  # steps past the run keep the last factor


def test_basis_step_scale_follows_each_basis_rms_never_below_one_nor_above_the_cap():
    B = torch.randn(2, 3, 16, 40)
    B /= B.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()  # every basis at RMS 1
    rms = torch.tensor([[0.1, 0.5, 1.0], [2.0, 0.25, 3.0]])
    s = basis_step_scale("decay", B * rms[:, :, None, None])
    assert basis_step_scale("constant", B) is None
    assert s is not None and s.shape == (2, 3, 1, 1)
    assert BASIS_STEP_CAP == 4.0
    assert torch.allclose(s.flatten(), torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 4.0]), rtol=1e-5)  # 6 capped
    old = basis_step_scale("decay", B * rms[:, :, None, None], cap=None)  # states from before the cap
    assert old is not None and torch.allclose(old.flatten(), torch.tensor([1.0, 1.0, 2.0, 4.0, 1.0, 6.0]), rtol=1e-5)


def _start(rms: list[float], E=6, p=8, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(E, p, d, generator=g)
    spec = MoBESpec(len(rms), p, "silu")
    B = torch.randn(1, len(rms), p, d, generator=g)
    B *= torch.tensor(rms)[None, :, None, None] / B.pow(2).mean(dim=(2, 3), keepdim=True).sqrt()
    f = MoBEFactors(torch.randn(E, p, p, generator=g) * 0.1, B, torch.randn(E, len(rms), generator=g), 1.0, "silu")
    return W, spec, f


@pytest.mark.parametrize("cls", [AlternatingSolver, AdamSolver])
def test_decay_steps_each_basis_relative_to_its_size(cls):
    """Adam's first step moves every entry by lr (m / sqrt(v) = ±1 after bias correction): under
    `decay` a basis of RMS 1.5 moves 3x as far as one at or below the reference RMS 0.5, one of RMS
    3 only BASIS_STEP_CAP = 4x (not 6x); under `constant` all move by lr."""
    lr = 0.01
    W, spec, f = _start([0.2, 0.5, 1.5, 3.0])
    for schedule, want in (("decay", [1.0, 1.0, 3.0, 4.0]), ("constant", [1.0, 1.0, 1.0, 1.0])):
        s = cls(W, spec, lr=lr, init=f, schedule=schedule, total_steps=1000)
        before = s.params["B"].clone()
        s.step()
        moved = (s.params["B"] - before).abs()[0]  # [m, r, d]
        for i, w in enumerate(want):  # entries with a gradient near Adam's eps move a little less
            assert float(moved[i].median()) == pytest.approx(lr * w, rel=1e-3), (schedule, i)
            assert float(moved[i].max()) <= lr * w * (1 + 1e-5), (schedule, i)


def test_decay_takes_smaller_steps_at_the_end_of_the_run():
    W, spec, f = _start([0.5, 0.5])
    moves = {}
    for total in (1000, 1):  # step 1 of 1000 is in the stable phase; step 1 of 1 is the last
        s = AlternatingSolver(W, spec, lr=0.01, init=f, schedule="decay", total_steps=total)
        before = s.params["B"].clone()
        s.step()
        moves[total] = float((s.params["B"] - before).abs().max())
    assert moves[1] == pytest.approx(moves[1000])  # a 1-step run decays over that one step: factor 1
    s = AlternatingSolver(W, spec, lr=0.01, init=f, schedule="decay", total_steps=10)
    _at_step(s, 9)
    before = s.params["B"].clone()
    s.step()  # step 10 of 10: lr / ceil(0.3 * 10)
    assert float((s.params["B"] - before).abs().max()) < 0.5 * moves[1000]


def _at_step(s, n):
    for _ in range(n):
        s.step()


def test_schedule_and_run_length_travel_with_the_state_and_old_states_are_constant():
    W, spec, f = _start([0.5, 1.0])
    a = AlternatingSolver(W, spec, lr=0.02, init=f, schedule="decay", total_steps=6)
    _at_step(a, 3)
    tensors, meta = a.state_dict()
    assert (meta["schedule"], meta["total_steps"], meta["basis_step_cap"]) == ("decay", 6, BASIS_STEP_CAP)
    b = AlternatingSolver(W, spec, lr=0.02, init=f)  # constructed with the defaults: the state decides
    b.load_state_dict(tensors, meta)
    for _ in range(3):
        a.step()
        b.step()
    assert torch.equal(a.params["B"], b.params["B"]) and torch.equal(a.params["alpha"], b.params["alpha"])
    old = {k: v for k, v in meta.items() if k not in ("schedule", "total_steps", "basis_step_cap")}  # before schedules
    c = AlternatingSolver(W, spec, lr=0.02, init=f, schedule="decay", total_steps=6)
    c.load_state_dict(tensors, old)
    assert (c.schedule, c.total_steps, c.basis_step_cap) == ("constant", None, None)
    with pytest.raises(ValueError, match="unknown schedule"):
        AlternatingSolver(W, spec, init=f, schedule="cosine")


def test_a_state_from_before_the_cap_resumes_uncapped():
    """A run checkpointed by a version without the cap goes on stepping its bases uncapped, so its
    arithmetic does not change mid-run; a new run is capped."""
    W, spec, f = _start([0.5, 3.0])
    ref = AlternatingSolver(W, spec, lr=0.01, init=f, schedule="decay", total_steps=100)
    ref.basis_step_cap = None  # what the code before the cap did
    _at_step(ref, 2)
    tensors, meta = ref.state_dict()
    meta.pop("basis_step_cap")  # as such a version wrote it
    old, new = (AlternatingSolver(W, spec, lr=0.01, init=f, schedule="decay", total_steps=100) for _ in range(2))
    old.load_state_dict(tensors, meta)
    new.load_state_dict(tensors, {**meta, "basis_step_cap": BASIS_STEP_CAP})
    assert old.basis_step_cap is None
    ref.step()
    old.step()
    new.step()
    assert torch.equal(old.params["B"], ref.params["B"])
    assert not torch.equal(new.params["B"], ref.params["B"])  # the RMS-3 basis steps 4x, not 6x
