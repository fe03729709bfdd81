"""`verify`: is this checkpoint directory complete, uncorrupted and consistent with its config?

Returns a list of problems (empty = fine). Cheap checks (a mobe-stream run left unfinished,
manifest sizes, index vs headers, shapes) always run; the sha256 of every shard and the NaN/Inf
scan of every floating tensor are the expensive part (`full=True`).

A directory without manifest.json (a hub checkpoint, not written by mobe-stream) is not a problem:
everything but the shard checksums is still checked and `note` is told what was skipped. A path that
is not a directory is bad input (CheckpointError), not a finding.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from .checkpoint import mobe_format
from .checkpoint.families import FUSED, get_family
from .checkpoint.families import PROJS as EXPERT_PROJS
from .checkpoint.reader import CheckpointReader
from .checkpoint.writer import MANIFEST_NAME, verify_manifest
from .errors import CheckpointError, MobeError
from .factorize import METHODS, MethodPlan


def verify(model_dir: str | Path, full: bool = True, note: Callable[[str], None] | None = None,
           own_run: bool = False) -> list[str]:
    """Problems found in `model_dir` (empty list: fine).

    note: receives remarks that are not problems (e.g. no manifest.json, so no checksums).
    own_run: the caller is the run still writing `model_dir` (its self-check before the journal is
    marked complete), so its lock and unfinished journal are expected, not findings.
    """
    d = Path(model_dir)
    if not d.is_dir():
        raise CheckpointError("not a directory" if d.exists() else "directory does not exist", d)
    problems = [] if own_run else incomplete_run(d)
    if (d / MANIFEST_NAME).exists():
        problems += _check_manifest(d, full)
    elif note is not None:
        note(f"{d}: no {MANIFEST_NAME} (not written by mobe-stream): shard checksums not checked")
    try:
        reader = CheckpointReader(d)  # validates index paths, every header, duplicates
    except MobeError as e:
        return problems + [str(e)]
    with reader:
        problems += _check_shapes(reader, d)
        if full:
            problems += _check_finite(reader)
    return problems


def incomplete_run(d: Path) -> list[str]:
    """A mobe-stream run that has not finished here: its journal says so, or its lock is still there."""
    journal, lock = d / mobe_format.JOURNAL_NAME, d / mobe_format.LOCK_NAME
    doc: object = {}
    if journal.exists():
        try:
            doc = json.loads(journal.read_text())
        except (OSError, ValueError) as e:
            return [f"{journal}: unreadable journal ({e})"]
    if not isinstance(doc, dict):
        return [f"{journal}: unreadable journal (not a JSON object)"]
    if journal.exists() and doc.get(mobe_format.JOURNAL_COMPLETE) is not True:
        why = "journal not complete"
    elif lock.exists():
        why = f"lock file {mobe_format.LOCK_NAME} present: a run is active or was killed"
    else:
        return []
    command = "export" if (doc.get("settings") or {}).get("method") == "export" else "compress"
    return [f"{d}: incomplete run ({why}): rerun {command} --resume"]


def _check_manifest(d: Path, full: bool) -> list[str]:
    problems = verify_manifest(d, full=full)
    try:
        listed = set(json.loads((d / MANIFEST_NAME).read_text())["shards"])
    except (OSError, ValueError, KeyError, TypeError):
        return problems
    problems += [f"{p}: shard not listed in {MANIFEST_NAME}" for p in sorted(d.glob("*.safetensors")) if p.name not in listed]
    return problems


def _expect(reader: CheckpointReader, name: str, shape: tuple, problems: list[str]) -> None:
    if name not in reader:
        problems.append(f"{reader.model_dir}: tensor {name} is missing")
    elif tuple(reader.info(name).shape) != tuple(shape):
        problems.append(f"{reader.model_dir}: tensor {name} has shape {tuple(reader.info(name).shape)}, "
                        f"config implies {tuple(shape)}")


def _check_shapes(reader: CheckpointReader, d: Path) -> list[str]:
    problems: list[str] = []
    try:
        fam = get_family(reader.config, reader)
    except MobeError as err:
        return [str(err)]
    E, p, hid = fam.num_experts, fam.moe_intermediate_size, fam.hidden_size
    mobe = reader.config.get("mobe")
    mobe_layers = set(mobe["layers"]) if mobe else set()
    for layer in fam.moe_layers():
        _expect(reader, fam.router_weight_name(layer), (E, hid), problems)
        projs = ("down_proj",) if layer in mobe_layers else EXPERT_PROJS
        if fam.layout == FUSED:
            for proj in dict.fromkeys("down_proj" if proj == "down_proj" else "gate_proj" for proj in projs):
                _expect(reader, fam.fused_tensor_name(layer, proj), fam.expert_shape(proj), problems)
        else:
            for proj in projs:
                for e in range(E):
                    _expect(reader, fam.expert_name(layer, e, proj), fam.expert_shape(proj), problems)
    if mobe:
        try:
            plan = MethodPlan.from_config(mobe)
        except (KeyError, TypeError, ValueError) as e:
            return problems + [f"{d / 'config.json'}: malformed 'mobe' block ({e!r})"]
        if plan.method not in METHODS:
            return problems + [f"{d / 'config.json'}: unknown mobe method {plan.method!r}"]
        shapes = plan.shapes(E, p, hid)
        for layer in mobe["layers"]:
            for proj in mobe.get("projections", mobe_format.PROJECTIONS):
                for suffix, factor_shape in shapes.items():
                    _expect(reader, mobe_format.factor_name(fam.experts_prefix(layer), proj, suffix), factor_shape, problems)
    return problems


SUPPORTED_WEIGHT_DTYPES = {"F32", "BF16", "F16", "F8_E4M3"}


def check_source(reader: CheckpointReader, fam) -> None:
    """Before compressing: expert tensors exist with the config's shapes and a dtype we can read."""
    problems = _check_shapes(reader, reader.model_dir)
    if problems:
        raise CheckpointError(problems[0].split(": ", 1)[1] + (f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""),
                              reader.model_dir)
    for layer in fam.moe_layers():
        for proj in EXPERT_PROJS:
            for name in fam.expert_tensor_names(layer, proj):
                dt = reader.info(name).dtype
                if not name.endswith("_scale_inv") and dt not in SUPPORTED_WEIGHT_DTYPES:
                    raise CheckpointError(f"tensor {name} has unsupported dtype {dt} (supported: "
                                          f"{', '.join(sorted(SUPPORTED_WEIGHT_DTYPES))})",
                                          reader.model_dir / reader.info(name).shard)


_FINITE_CHUNK = 1 << 26  # elements tested at once: the temporary mask stays at 64 MB whatever the tensor


def _has_nonfinite(t: torch.Tensor) -> bool:
    """NaN or Inf anywhere in `t`. FP8 is tested on its raw bytes (e4m3fn: S.1111.111 is NaN, it has
    no Inf; e5m2: exponent all ones), so no dequantized copy is made; the scale is a tensor of its own."""
    flat = t.reshape(-1)
    if t.dtype == torch.float8_e4m3fn:
        bits, mask = flat.view(torch.uint8), 0x7F
    elif t.dtype == torch.float8_e5m2:
        bits, mask = flat.view(torch.uint8), 0x7C
    elif t.is_floating_point():
        return any(not torch.isfinite(flat[i:i + _FINITE_CHUNK]).all() for i in range(0, flat.numel(), _FINITE_CHUNK))
    else:
        return False
    return any(((bits[i:i + _FINITE_CHUNK] & mask) == mask).any() for i in range(0, bits.numel(), _FINITE_CHUNK))


def _check_finite(reader: CheckpointReader) -> list[str]:
    """Every floating tensor, one at a time through the reader (never a whole shard in RAM), in
    file order so the disk reads sequentially; reports the first bad tensor and how many more."""
    bad = []
    for name in sorted(reader.names(), key=lambda n: (reader.info(n).shard, reader.info(n).offset)):
        if _has_nonfinite(reader.get(name)):
            bad.append(name)
    if not bad:
        return []
    first = reader.info(bad[0])
    more = f" (and {len(bad) - 1} more tensor(s))" if len(bad) > 1 else ""
    return [f"{reader.model_dir / first.shard}: tensor {bad[0]} contains NaN or Inf{more}"]
