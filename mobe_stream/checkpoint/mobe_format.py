"""Names of the MoBE checkpoint format (docs/FORMAT.md): the one owner of factor tensor names.

A compressed projection of layer N is stored under the family's experts prefix
(`model.layers.N.mlp.experts.` for every family so far) as `<prefix><proj>.<suffix>`, e.g.
`model.layers.3.mlp.experts.gate_proj.mobe_A`. Which suffixes a method stores and their shapes
are the method plan's business (factorize/baselines.py); this module only spells names.
"""

from __future__ import annotations

import torch

from .fp8 import SCALE_SUFFIX, stored_bytes

FORMAT_VERSION = 1
PROJECTIONS = ("gate_proj", "up_proj")  # the expert projections MoBE rewrites; down_proj is kept
MOBE_SUFFIXES = ("mobe_A", "mobe_B", "mobe_alpha")
LOWRANK_SUFFIXES = ("lowrank_U", "lowrank_V", "lowrank_mean")
FACTOR_SUFFIXES = MOBE_SUFFIXES + LOWRANK_SUFFIXES  # every suffix a compressed projection may store
ALPHA = "mobe_alpha"  # stored fp32 whatever the output dtype (mixing logits are tiny and sensitive)
# With `--dtype fp8` every other factor is float8_e4m3fn with an fp32 `<name>_scale_inv` companion,
# one [ceil(rows/128), ceil(cols/128)] block grid per matrix of the stack (docs/FORMAT.md).

# Run-time files a mobe-stream run leaves in its output dir (FORMAT.md). Named here, below the
# pipeline that writes them, so that `verify` can recognise an unfinished run without importing it.
JOURNAL_NAME = "mobe-journal.json"
EXPORT_KEY = "mobe_exported_from"  # config key of an exported checkpoint: the compact form's mobe block
JOURNAL_COMPLETE = "complete"  # the journal's flag, set true once the index and manifest are written
LOCK_NAME = ".mobe-stream.lock"
STATE_DIR = ".mobe-state"  # solver checkpoints of unfinished units, next to the journal


def factor_name(experts_prefix: str, proj: str, suffix: str) -> str:
    """`<experts_prefix><proj>.<suffix>`; experts_prefix ends with a dot (absolute or layer-relative)."""
    return f"{experts_prefix}{proj}.{suffix}"


def factor_names(experts_prefix: str, proj: str, suffixes) -> dict[str, str]:
    """suffix -> tensor name for one projection."""
    return {s: factor_name(experts_prefix, proj, s) for s in suffixes}


def projection_bytes(shapes: dict[str, tuple[int, ...]], dtype: torch.dtype, block: tuple[int, int] = (128, 128)) -> int:
    """Stored bytes of one compressed projection: `shapes` is suffix -> shape (the method plan's),
    every factor in `dtype` (FP8 with its block scales) except the fp32 mixing logits."""
    return sum(stored_bytes(shape, torch.float32 if suffix == ALPHA else dtype, block) for suffix, shape in shapes.items())


def is_factor(name: str) -> bool:
    """A factor tensor or the FP8 scale companion of one (`...mobe_A_scale_inv`)."""
    return name.rsplit(".", 1)[-1].removesuffix(SCALE_SUFFIX) in FACTOR_SUFFIXES
