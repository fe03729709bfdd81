"""The solvers' step-size policy (`--schedule`): how big each Adam step is, by step and by basis.

`constant` (the paper's, and every run before this option): every parameter steps with `lr` at
every step.

`decay` (the default): two changes, each measured on a trained model (CHANGELOG, issue 12's note):
- relative basis steps: basis i steps with lr · max(rms(B_i), BASIS_RMS) / BASIS_RMS. Adam moves an
  entry by ~lr whatever its gradient, and the bases of a good fit grow (entry RMS 0.5 at the
  `scaled` start, ~1.5 after 1000 steps and still growing at 4000 on a trained Qwen3-MoE), so a
  fixed step becomes a smaller and smaller relative change: the slow tail of the fit. Scaling the
  step with the basis keeps it a fixed fraction of the basis (as Adafactor's relative step does).
  Never below lr, so a small start (the `paper` init's bases have entries ~1/sqrt(d)) is not slowed.
  Capped at BASIS_STEP_CAP x lr (a basis past RMS 2 steps as one of RMS 2): steps proportional to
  size make growth feed on itself, and without the cap the bases ran away (trained tiny model,
  2000 steps: RMS 4.6 on average, 12.5 with 2 groups, up to 27) into SiLU's near-linear-for-positive
  regime, where scale is almost free; there the fit sat at an oscillation floor and longer grouped
  runs ended worse than shorter ones. With the cap: grouped runs of 2000 steps -1.6..3.1% on all 6
  projections measured, ungrouped runs of 1000/2000 steps within ±0.2%, 2500 steps -0.6% (CHANGELOG).
- decay: lr constant for the first (1 - DECAY_FRACTION) of the run's steps, then linearly down to
  ~0 at its last step (warmup-stable-decay without the warmup: Adam starts with bias-corrected
  moments). A constant lr leaves Adam oscillating around the minimum it has found; the decay
  settles it. The run's total steps are part of the schedule, so they are recorded with the state.
Together, on every MoE projection of the trained tiny Qwen3-MoE at 1000 steps, the final error is
what a constant lr reaches in about twice as many steps (figures in the CHANGELOG).
"""

from __future__ import annotations

import math

import torch

from .init import BASIS_RMS  # the `scaled` start's entry RMS: a basis of that RMS steps with lr itself

SCHEDULES = ("decay", "constant")
BASIS_STEP_CAP = 4.0  # most a basis's step may grow to, x lr (3 and 6 measured alike, uncapped worse)
DECAY_FRACTION = 0.3  # of the run's steps, at the end (0.2-0.5 measured alike; 1.0 worse)


def lr_factor(schedule: str, step: int, total: int | None) -> float:
    """The multiple of lr that step `step` (1-based) of a `total`-step run takes."""
    if schedule == "constant" or not total:
        return 1.0
    span = max(1, math.ceil(DECAY_FRACTION * total))
    return min(1.0, max(total - step + 1, 1) / span)


def basis_step_scale(schedule: str, B: torch.Tensor, cap: float | None = BASIS_STEP_CAP) -> torch.Tensor | None:
    """The multiple of the step that each basis of B [G, m_g, r, d] takes: under `decay`
    max(rms(B_i), BASIS_RMS) / BASIS_RMS, at most `cap` (None: uncapped, as states written before
    the cap step), shaped [G, m_g, 1, 1] (a norm over each basis: no temporary of B's size); None
    (no scaling) under `constant`."""
    if schedule == "constant":
        return None
    rms = torch.linalg.vector_norm(B, dim=(2, 3), keepdim=True) / math.sqrt(B.shape[2] * B.shape[3])
    scale = rms.clamp_min(BASIS_RMS) / BASIS_RMS
    return scale if cap is None else scale.clamp_max(cap)
