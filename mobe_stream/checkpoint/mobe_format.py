"""Names of the MoBE checkpoint format (docs/FORMAT.md): the one owner of factor tensor names.

A compressed projection of layer N is stored under the family's experts prefix
(`model.layers.N.mlp.experts.`; Mixtral/MiniMax-M2 `model.layers.N.block_sparse_moe.experts.`) as
`<prefix><proj>.<suffix>` with proj gate_proj/up_proj whatever the family calls them, e.g.
`model.layers.3.mlp.experts.gate_proj.mobe_A`. Which suffixes a method stores and their shapes
are the method plan's business (factorize/baselines.py); this module only spells names.
"""

from __future__ import annotations

import torch

from . import mxfp4
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

# A compact output must never load as the source architecture by accident (transformers would fill
# the missing gate/up weights with random values and warn, a model that generates garbage while
# looking fine): its config names a model_type transformers does not know and points `auto_map` at
# the modeling file written next to it (mobe_stream/hf/modeling_mobe.py), which needs
# trust_remote_code=True. The source's model_type and architectures stay in the mobe block.
MODELING_FILE = "modeling_mobe.py"
COMPACT_PREFIX = "mobe_"
_HF_STEMS = {"qwen3_moe": "MobeQwen3Moe", "deepseek_v3": "MobeDeepseekV3", "kimi_k2": "MobeKimiK2"}
SOURCE_NAMES = {"README.md": "SOURCE_README.md", "LICENSE": "SOURCE_LICENSE", "LICENSE.md": "SOURCE_LICENSE.md",
                "LICENSE.txt": "SOURCE_LICENSE.txt"}  # the source's card and license, kept under names that say so
CARD_NAME = "README.md"  # our generated model card


def compact_config(config: dict, mobe: dict, family: str) -> dict:
    """The config.json of a compact output: the source's, with the mobe block, a model_type of its
    own and the `auto_map` of the modeling file (an MXFP4 source's quantization_config dropped: its
    tensors are read, and so written, dense)."""
    # the source's remote code is not ours to point at
    out = {k: v for k, v in mxfp4.dense_config(config).items() if k != "auto_map"}
    out["mobe"] = dict(mobe, source_model_type=config.get("model_type"), source_architectures=config.get("architectures"))
    out["model_type"] = COMPACT_PREFIX + str(config.get("model_type") or family)
    stem = _HF_STEMS.get(family)
    if stem is not None:
        out["architectures"] = [f"{stem}ForCausalLM"]
        module = MODELING_FILE.removesuffix(".py")
        out["auto_map"] = {"AutoConfig": f"{module}.{stem}Config", "AutoModelForCausalLM": f"{module}.{stem}ForCausalLM"}
    return out


def source_config(config: dict) -> dict:
    """A config as its source family spells it: a compact output's model_type and architectures
    restored from its mobe block (auto_map dropped); any other config unchanged."""
    mobe = config.get("mobe")
    if not isinstance(mobe, dict) or "source_model_type" not in mobe:
        return config
    out = {k: v for k, v in config.items() if k != "auto_map"}
    out["model_type"] = mobe["source_model_type"]
    if mobe.get("source_architectures") is not None:
        out["architectures"] = mobe["source_architectures"]
    return out


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
