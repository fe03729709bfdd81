"""The defaults of `compress` that the CLI shows and CompressOptions uses: one owner, torch-free
(the CLI reads them at import time, before any heavy import). How each was chosen: CHANGELOG."""

SOLVER = "adam"
INIT = "clustered"
STEPS = 1000
PRECISION = "auto"
LR = 0.07
