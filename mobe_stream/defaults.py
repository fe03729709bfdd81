"""The defaults of `compress` that the CLI shows and CompressOptions uses: one owner, torch-free
(the CLI reads them at import time, before any heavy import). How each was chosen: CHANGELOG."""

SOLVER = "als"  # variable projection: no per-expert optimizer state; fewer steps to the reference's error
INIT = "scaled"  # grouped SVD with bases at entry RMS 0.5, own logit 3 (factorize/init.py)
STEPS = 1000
PRECISION = "auto"
LR = 0.07
