"""The defaults of `compress` that the CLI shows and CompressOptions uses: one owner, torch-free
(the CLI reads them at import time, before any heavy import). How each was chosen: CHANGELOG."""

SOLVER = "als"  # variable projection: no per-expert optimizer state; fewer steps to the reference's error
INIT = "scaled"  # grouped SVD with bases at entry RMS 0.5, own logit 3 (factorize/init.py)
STEPS = 1000
PRECISION = "auto"
SCHEDULE = "decay"  # relative basis steps + lr decay over the last 30% (factorize/schedule.py)
LR = 0.07
# --calib (pipeline/calib.py): 64 windows of 2048 tokens, as GPTQ-style recipes use; the input
# metric's rank by measurement (tools/bench_calib.py: quality rises with the rank, and so does the
# cost: Kimi-K2 1.4 GB of metric per layer at 128); damping GPTQ's 1% of the mean diagonal
CALIB_TOKENS = 131072
CALIB_CTX = 2048
CALIB_RANK = 128
CALIB_DAMP = 0.01
