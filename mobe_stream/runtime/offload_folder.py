"""`--offload-folder`: disk-offloaded weights cast to the compute dtype once, kept for later runs.

A "disk" unit is read from the checkpoint's own safetensors shards (mmap) on every fetch. A tensor
stored in another dtype than it computes in (a bf16 checkpoint run in fp32) is cast again on every
fetch; with an offload folder the cast is done once: the unit's tensors that need it are written
there, in the compute dtype, as one safetensors file per unit (`layers.3.safetensors`), and fetches,
in this run and later ones, map that file instead. Tensors already in their compute dtype are not
copied (the shards serve them as they are), and FP8 weights are never converted: they stay as
stored with their block scales and are dequantized at use (a bf16 copy of Kimi-K2 would be 2 TB).
accelerate writes every disk weight to its offload folder on every load; here the folder holds
only what saves work, and only once.

`index.json` records what the files were made from: the checkpoint's fingerprint
(checkpoint/fingerprint.py), the compute dtype and, per unit, its file and tensors (name -> dtype,
shape). A run that finds the same checkpoint and dtype reuses the files (they are not rewritten)
and writes only the units missing; another checkpoint, a changed one or another dtype rewrites
them, with one warning saying why. Each file is written under a temporary name, fsynced and
renamed (safetensors_io.atomic_file), the index after the unit's file, so a killed run leaves an
index that names only complete files. The folder must not be or lie inside the model directory
(paths.is_inside); files our index does not name are never touched, and a folder whose index.json
is not ours (accelerate's, say) is refused.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from ..checkpoint.fingerprint import SourceFingerprint
from ..checkpoint.hub_cache import containment_root
from ..checkpoint.reader import CheckpointReader
from ..checkpoint.safetensors_io import TORCH_TO_ST, atomic_write_json, read_header, stream_safetensors
from ..dtypes import dtype_key
from ..errors import CheckpointError, ConfigError, warning
from ..paths import is_inside
from .config import RuntimeConfig
from .device_map import Warn
from .weights import stored_dtype, target_dtype, unit_scales, unit_tensors

INDEX = "index.json"
FORMAT = "mobe-stream-offload/1"
_UNIT_FILE = re.compile(r"^(embed|norm|lm_head|layers\.\d+)\.safetensors$")


def conversions(reader: CheckpointReader, cfg: RuntimeConfig, unit: str, dtype: torch.dtype) -> dict[str, torch.dtype]:
    """Stored name -> compute dtype of the unit's tensors stored in another dtype (FP8 weights with
    block scales are not among them: they are dequantized at use, never converted)."""
    tensors = unit_tensors(reader, cfg, unit)
    scales = unit_scales(reader, tensors)
    out = {}
    for rel, name in tensors.items():
        if rel in scales:
            continue
        stored = stored_dtype(reader, name)
        target = target_dtype(cfg, rel, stored, dtype)
        if target != stored:
            out[name] = target
    return out


def _record(reader: CheckpointReader, unit: str, conv: dict[str, torch.dtype]) -> dict:
    return {"file": f"{unit}.safetensors",
            "tensors": {n: [TORCH_TO_ST[dt], list(reader.info(n).shape)] for n, dt in conv.items()}}


def _file_matches(path: Path, record: dict) -> bool:
    """The unit's file is there, whole, and holds what the index says."""
    try:
        header = read_header(path)
    except CheckpointError:
        return False
    have = {n: [e.dtype, list(e.shape)] for n, e in header.tensors.items()}
    return have == record["tensors"]


def check_folder(folder: str | Path, model_dir: Path) -> None:
    """Refuse an offload folder that is or lies inside the model directory (for a hub cache snapshot:
    its models--* tree), however reached: nothing of ours is ever written there."""
    if is_inside(Path(folder).expanduser(), containment_root(model_dir)):
        raise ConfigError(f"--offload-folder must not be or lie inside the model directory {model_dir}", folder)


class OffloadFolder:
    """Converted copies of the disk units' tensors: `paths` maps a stored name to the file holding it."""

    def __init__(self, folder: str | Path, reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype,
                 units: list[str], warn: Warn | None = None):
        self.folder = Path(folder).expanduser()
        self.paths: dict[str, Path] = {}
        self.written: list[str] = []  # units written by this run (the rest were reused)
        warn = warn or warning
        check_folder(self.folder, reader.model_dir)
        needed = {u: c for u in units if (c := conversions(reader, cfg, u, dtype))}
        if not needed:
            return  # every disk tensor is served by the shards as stored: nothing to write, no folder made
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"cannot create the offload folder ({e.strerror or e})", self.folder) from None
        fingerprint = reader.fingerprint()
        old = self._load_index()
        kept: dict[str, dict] = {}
        if old is not None:
            why = self._stale(old, fingerprint, dtype)
            if why:
                warn(f"{self.folder}: offload files were written for {why}; rewriting them")
                self._remove(old)
            else:
                kept = dict(old["units"])
        index: dict = {"format": FORMAT, "fingerprint": fingerprint.to_json(), "dtype": dtype_key(dtype), "units": kept}
        for unit, conv in needed.items():
            record = _record(reader, unit, conv)
            path = self.folder / record["file"]
            if kept.get(unit) != record or not _file_matches(path, record):
                if unit in kept:
                    warn(f"{path}: missing or not what {INDEX} records; rewriting it")
                self._write(reader, path, conv)
                kept[unit] = record
                atomic_write_json(self.folder / INDEX, index)
                self.written.append(unit)
            self.paths.update(dict.fromkeys(conv, path))

    def _load_index(self) -> dict | None:
        path = self.folder / INDEX
        if not path.exists():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise ConfigError(f"unreadable ({e}); use another --offload-folder", path) from None
        if not isinstance(data, dict) or data.get("format") != FORMAT or not isinstance(data.get("units"), dict):
            raise ConfigError(f"not a mobe-stream offload index (format {FORMAT}); use an empty or new --offload-folder",
                              path)
        return data

    @staticmethod
    def _stale(old: dict, fingerprint: SourceFingerprint, dtype: torch.dtype) -> str | None:
        """Why the folder's files cannot be reused (None: they can)."""
        try:
            changes = fingerprint.changes_since(SourceFingerprint.from_json(old["fingerprint"]))
        except (KeyError, ValueError):
            return "an unknown checkpoint (no fingerprint in the index)"
        if changes:
            return f"another checkpoint or a changed one ({'; '.join(changes)})"
        if old.get("dtype") != dtype_key(dtype):
            return f"dtype {old.get('dtype')}, not {dtype_key(dtype)}"
        return None

    def _remove(self, old: dict) -> None:
        """Delete the files an old index names (ours by name, inside the folder) and the index itself."""
        for record in old["units"].values():
            name = record.get("file") if isinstance(record, dict) else None
            if isinstance(name, str) and _UNIT_FILE.match(name):
                (self.folder / name).unlink(missing_ok=True)
        (self.folder / INDEX).unlink(missing_ok=True)

    @staticmethod
    def _write(reader: CheckpointReader, path: Path, conv: dict[str, torch.dtype]) -> None:
        """One unit's converted tensors, read and cast one at a time (the same cast as a fetch makes)."""
        entries = [(n, dt, tuple(reader.info(n).shape)) for n, dt in conv.items()]
        stream_safetensors(path, entries, (reader.get(n).to(dt) for n, dt in conv.items()), {"format": "pt"})
