"""CheckpointReader: a lazy, validated view of a Hugging Face safetensors model directory.

Everything about the tensors (shard, dtype, shape) is known from the headers alone; tensor data is
read one tensor (or one expert slice) at a time through safetensors' mmap, never a whole shard.
A directory that only holds pickle weights is refused: mobe-stream never unpickles.
MXFP4 pairs (gpt-oss `X_blocks` + `X_scales`) are presented as the one dense tensor `X` they encode,
dequantized on read (checkpoint/mxfp4.py): no consumer ever sees the packed bytes.
"""

from __future__ import annotations

import gc
import hashlib
import json
import os
from collections import OrderedDict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from . import fp8, mxfp4
from .fingerprint import SourceFingerprint
from .hub_cache import containment_root
from .safetensors_io import read_header

CONFIG_NAME = "config.json"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
PICKLE_SUFFIXES = (".bin", ".pth", ".pt")


class _ShardSummary(NamedTuple):
    file_size: int
    data_start: int
    raw_sha256: bytes
    header_len: int


class TensorInfo(NamedTuple):
    name: str
    shard: str  # shard filename, relative to the model dir
    dtype: str  # safetensors dtype string: "BF16", "F8_E4M3", ...
    shape: tuple[int, ...]
    nbytes: int = 0
    offset: int = 0  # absolute byte offset of the data in the shard file (for direct/offloaded reads)


def load_json(path: Path, what: str) -> Any:
    """Read a JSON file, turning every failure into a CheckpointError naming the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{what} is missing", path) from None
    except OSError as e:
        raise CheckpointError(f"cannot read {what} ({e.strerror or e})", path) from None
    try:
        return json.loads(text, object_pairs_hook=no_duplicate_keys)
    except ValueError as e:
        raise CheckpointError(f"{what} is not valid JSON ({e})", path) from None


def no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict:
    """json.loads object_pairs_hook: a key given twice is an error (json keeps the last silently)."""
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k!r}")
        out[k] = v
    return out


class CheckpointReader:
    """Validates config, index and every shard header on open; reads tensors lazily."""

    def __init__(self, model_dir: str | os.PathLike, max_open_shards: int | None = 1,
                 recycle_bytes: int | None = 256 << 20):
        """max_open_shards: shard handles kept open (LRU; None = all, 0 = open for every read).
        recycle_bytes: reopen a cached handle after this many bytes were read through it.

        Tensors from `get` are zero-copy views of safetensors' mmap, and every page touched through
        a mapping stays in this process's RSS (file-backed, reclaimable) until the mapping is gone,
        i.e. until its handle and all tensors read through it are freed. Caching every handle lets
        RSS climb to the size of the checkpoint; opening per read re-parses the header each time
        (ms for shards with thousands of tensors). One handle, recycled every 256 MiB, bounds RSS to
        about the live tensors plus 256 MiB per mapping they keep alive.
        """
        self.model_dir = Path(model_dir)
        self.max_open_shards = max_open_shards
        self.recycle_bytes = recycle_bytes
        self._read_through: dict[str, int] = {}
        if not self.model_dir.is_dir():
            raise CheckpointError("model directory does not exist or is not a directory", self.model_dir)
        self.config_path = self.model_dir / CONFIG_NAME
        self.config: dict = load_json(self.config_path, "config")
        if not isinstance(self.config, dict):
            raise CheckpointError("config is not a JSON object", self.config_path)
        self._headers: dict[str, _ShardSummary] = {}
        self._infos: dict[str, TensorInfo] = {}
        self._handles: OrderedDict[str, Any] = OrderedDict()
        self._mxfp4: dict[str, tuple[TensorInfo, TensorInfo]] = {}  # dense name -> (blocks, scales) as stored
        with _gc_paused():
            self._load_headers(self._weight_map())
        self._pair_mxfp4()
        self.fp8_block: tuple[int, int] | None = _fp8_block(self.config)

    # ---- opening -------------------------------------------------------------------------------

    def _weight_map(self) -> dict[str, str] | None:
        """tensor -> shard from the index; None means a single `model.safetensors`."""
        index_path = self.model_dir / INDEX_NAME
        if index_path.exists():
            doc = load_json(index_path, "index")
            wm = doc.get("weight_map") if isinstance(doc, dict) else None
            if not isinstance(wm, dict) or not all(isinstance(v, str) for v in wm.values()):
                raise CheckpointError("index has no valid weight_map (tensor name -> shard file)", index_path)
            first_tensor: dict[str, str] = {}  # checked once per shard: resolve() per tensor took a minute on Kimi-K2
            for name, shard in wm.items():
                first_tensor.setdefault(shard, name)
            for shard, name in first_tensor.items():
                self._check_inside(index_path, name, shard)
            return wm
        if (self.model_dir / SINGLE_NAME).is_file():
            return None
        if any(self.model_dir.glob("*.safetensors")):
            raise CheckpointError(f"has *.safetensors shards but no {INDEX_NAME} or {SINGLE_NAME}", self.model_dir)
        pickles = sorted(p.name for p in self.model_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointError(f"holds only pickle weights ({pickles[0]}); mobe-stream never unpickles "
                                  f"(arbitrary code execution risk): convert the model to safetensors first",
                                  self.model_dir)
        raise CheckpointError(f"no {SINGLE_NAME} or {INDEX_NAME} found", self.model_dir)

    def _check_inside(self, index_path: Path, name: str, shard: str) -> None:
        """Refuse index entries that would make us open a file outside the model directory (for a
        Hugging Face cache snapshot: outside its models--* tree, where its symlinks point)."""
        rel = Path(shard)
        if not shard or rel.is_absolute() or ".." in rel.parts or shard.startswith("~"):
            raise CheckpointError(f"weight_map entry for {name} points outside the model directory: {shard!r}", index_path)
        root = containment_root(self.model_dir)
        target = (self.model_dir / rel).resolve()
        if root != target and root not in target.parents:
            raise CheckpointError(f"weight_map entry for {name} resolves outside the model directory: "
                                  f"{shard!r} -> {target}", index_path)

    def _load_headers(self, weight_map: dict[str, str] | None) -> None:
        shards = [SINGLE_NAME] if weight_map is None else list(dict.fromkeys(weight_map.values()))
        found: dict[str, TensorInfo] = {}  # every tensor of every header, in shard order
        for shard in shards:
            path = self.model_dir / shard
            if not path.is_file():
                raise CheckpointError(f"shard listed in {INDEX_NAME} is missing", path)
            header = read_header(path)
            start = header.data_start
            for name, e in header.tensors.items():
                if name in found:
                    raise CheckpointError(f"duplicate tensor {name}: stored in two shards ({found[name].shard} and {shard})",
                                          path)
                found[name] = TensorInfo(name, shard, e.dtype, e.shape, e.end - e.begin, start + e.begin)
            # keep only what fingerprint() needs: per-tensor header objects would double the metadata
            # (about 1 KB per tensor, i.e. ~140 MB for Kimi-K2's 140k tensors)
            self._headers[shard] = _ShardSummary(header.file_size, header.data_start,
                                                 hashlib.sha256(header.raw).digest(), len(header.raw))
        if weight_map is None:
            self._infos = found
            return
        for name, want in weight_map.items():  # index order
            info = found.get(name)
            if info is None or info.shard != want:
                path = self.model_dir / want
                if info is None:
                    raise CheckpointError(f"tensor {name} is listed in {INDEX_NAME} but not in the shard header", path)
                raise CheckpointError(f"tensor {name} is listed in {INDEX_NAME} for {want} but stored in {info.shard}", path)
            self._infos[name] = info

    def _pair_mxfp4(self) -> None:
        """Replace each uint8 `X_blocks`/`X_scales` pair by the dense `X` (bfloat16, shape from the headers)."""
        if not any(n.endswith(mxfp4.BLOCKS_SUFFIX) for n in self._infos):
            return
        out: dict[str, TensorInfo] = {}
        for name, info in self._infos.items():
            dense = mxfp4.pair_of(name)
            scales = self._infos.get(f"{dense}{mxfp4.SCALES_SUFFIX}") if dense is not None else None
            if dense is None or scales is None or info.dtype != "U8" or scales.dtype != "U8":
                out.setdefault(name, info)
                continue
            bad = mxfp4.check_pair(info.shape, scales.shape)
            if bad is not None:
                raise CheckpointError(f"MXFP4 tensor {dense}: {bad}", self.model_dir / info.shard)
            if dense in self._infos:
                raise CheckpointError(f"tensor {dense} is stored both dense and as MXFP4 blocks", self.model_dir / info.shard)
            shape = mxfp4.dense_shape(info.shape)
            out[dense] = TensorInfo(dense, info.shard, mxfp4.DENSE_ST, shape, mxfp4.dense_nbytes(shape), info.offset)
            self._mxfp4[dense] = (info, scales)
        for _, scales in self._mxfp4.values():
            out.pop(scales.name, None)
        self._infos = out

    def is_derived(self, name: str) -> bool:
        """True for a tensor no shard holds under its own name (MXFP4: dequantized from its blocks)."""
        return name in self._mxfp4

    # ---- metadata ------------------------------------------------------------------------------

    @property
    def shards(self) -> list[str]:
        return list(self._headers)

    def names(self) -> list[str]:
        return list(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._infos

    def __len__(self) -> int:
        return len(self._infos)

    def info(self, name: str) -> TensorInfo:
        try:
            return self._infos[name]
        except KeyError:
            raise CheckpointError(f"tensor {name} is not in the checkpoint", self.model_dir) from None

    def shard_path(self, shard: str) -> Path:
        return self.model_dir / shard

    def fingerprint(self, sample_bytes: int = 1 << 16) -> SourceFingerprint:
        """What a resumed run must find unchanged (see `fingerprint.py` for the choices and their cost).

        The digest is a sha256 over every shard's name, size and raw header, plus three samples of
        its data (start, middle, end): it detects a replaced or re-downloaded source with the same
        layout without reading terabytes. An in-place edit between the samples is caught by the
        shards' stat identity (ctime), config and index changes by their full sha256. Not a
        full-content hash of the shards (at 1 TB that costs 10-15 minutes per resume)."""
        h = hashlib.sha256()
        for shard in sorted(self._headers):
            header = self._headers[shard]
            h.update(f"{shard}\0{header.file_size}\0{header.header_len}\0".encode())
            h.update(header.raw_sha256)
            start, end = header.data_start, header.file_size
            with open(self.model_dir / shard, "rb") as f:
                for pos in (start, (start + end) // 2, max(start, end - sample_bytes)):
                    f.seek(pos)
                    h.update(f.read(sample_bytes))
        return SourceFingerprint.take(self.model_dir, h.hexdigest(), CONFIG_NAME, INDEX_NAME, list(self._headers))

    # ---- data ----------------------------------------------------------------------------------

    def _handle(self, shard: str, nbytes: int = 0):
        """A safe_open handle for `shard`: opened lazily, kept in a small LRU, recycled by bytes read."""
        handle = self._handles.get(shard)
        if handle is not None:
            used = self._read_through.get(shard, 0) + nbytes
            if self.recycle_bytes is None or used <= self.recycle_bytes or used == nbytes:
                self._handles.move_to_end(shard)
                self._read_through[shard] = used
                return handle
            del self._handles[shard]  # its mmap goes once the tensors read through it are freed
        path = self.model_dir / shard
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"cannot open shard ({e})", path) from None
        if self.max_open_shards is None or self.max_open_shards > 0:
            self._handles[shard] = handle
            self._read_through[shard] = nbytes
            while self.max_open_shards is not None and len(self._handles) > self.max_open_shards:
                self._handles.popitem(last=False)
        return handle

    def get(self, name: str, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The tensor as stored (dtype None, bit-exact), or FP8-dequantized / cast to `dtype`.

        dtype None returns a zero-copy view of the shard's private mmap: treat it as read-only
        (an in-place change would show in later reads through the same handle). With a dtype the
        result is always a fresh tensor, safe to modify.
        """
        if name in self._mxfp4:
            return self._dense(name, None, dtype)
        info = self.info(name)
        t = self._read(info, lambda h: h.get_tensor(name), info.nbytes)
        if dtype is None:
            return t
        scale = self.scale_of(name)
        if scale is not None:
            return self._dequantize(name, t, self.get(scale), dtype)
        return t.to(dtype, copy=True)

    def get_expert(self, name: str, index: int, dtype: torch.dtype | None = None) -> torch.Tensor:
        """Slice `[index]` of a fused `[E, ...]` tensor; only that expert's bytes are read."""
        info = self.info(name)
        if len(info.shape) < 2 or not 0 <= index < info.shape[0]:
            raise CheckpointError(f"tensor {name} of shape {list(info.shape)} has no expert slice {index}",
                                  self.model_dir / info.shard)
        if name in self._mxfp4:
            return self._dense(name, index, dtype)
        t = self._read(info, lambda h: h.get_slice(name)[index], info.nbytes // info.shape[0])
        if dtype is None:
            return t
        scale = self.scale_of(name)
        if scale is not None:
            s = self._read(self.info(scale), lambda h: h.get_slice(scale)[index])
            return self._dequantize(name, t, s, dtype)
        return t.to(dtype, copy=True)

    def _dense(self, name: str, index: int | None, dtype: torch.dtype | None) -> torch.Tensor:
        """An MXFP4 tensor (or its expert slice `index`) dequantized (bfloat16 when dtype is None: exact)."""
        blocks, scales = (self._read(i, lambda h, n=i.name: h.get_tensor(n) if index is None else h.get_slice(n)[index],
                                     i.nbytes if index is None else i.nbytes // i.shape[0]) for i in self._mxfp4[name])
        return mxfp4.dequantize(blocks, scales, dtype or mxfp4.DENSE_DTYPE)

    def _check_size(self, shard: str) -> None:
        """Refuse to read through the mmap of a shard that shrank since its header was read.

        Touching a mapped page past the end of a truncated file raises SIGBUS, which kills the
        process with no message; one stat (about a microsecond) per tensor read turns a shard cut or
        rewritten under a running job into a one-line error. A shard cut between this check and
        the read still dies of SIGBUS (the CLI's faulthandler then names the line); --resume redoes
        only the unfinished unit.
        """
        want = self._headers[shard].file_size
        try:
            size = os.stat(os.path.join(self.model_dir, shard)).st_size  # not pathlib: half the cost
        except OSError as e:
            raise CheckpointError(f"shard disappeared during the run ({e.strerror or e})",
                                  self.model_dir / shard) from None
        if size != want:
            how = "shrank" if size < want else "grew"
            raise CheckpointError(f"file {how} from {want} to {size} bytes during the run "
                                  f"(truncated or being rewritten?)", self.model_dir / shard)

    def _read(self, info: TensorInfo, fetch, nbytes: int = 0) -> torch.Tensor:
        self._check_size(info.shard)
        try:
            return fetch(self._handle(info.shard, nbytes))
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"cannot read tensor {info.name} ({e})", self.model_dir / info.shard) from None

    @property
    def scale_block(self) -> tuple[int, int]:
        """Block size that `weight_scale_inv` tensors of this checkpoint use."""
        return self.fp8_block or fp8.DEFAULT_BLOCK

    def scale_of(self, name: str) -> str | None:
        """Name of the block scale that `name` is dequantized with (an FP8 tensor with a `_scale_inv`
        companion: `X.weight` -> `X.weight_scale_inv`, or any other `X` -> `X_scale_inv`), else None."""
        scale = fp8.scale_name(name)
        return scale if self.info(name).dtype == "F8_E4M3" and scale in self._infos else None

    def _dequantize(self, name: str, q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        try:
            return fp8.dequantize_stack(q, scale, self.scale_block, dtype)  # 2-D, fused [E, ...] or stacked factors
        except ValueError as e:
            raise CheckpointError(f"cannot dequantize {name}: {e}", self.model_dir / self.info(name).shard) from None

    # ---- lifetime ------------------------------------------------------------------------------

    def close(self) -> None:
        """Drop the cached shard handles (their mmaps go away once no tensor refers to them)."""
        self._handles.clear()
        self._read_through.clear()

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"CheckpointReader({str(self.model_dir)!r}, {len(self._infos)} tensors, {len(self._headers)} shards)"


@contextmanager
def _gc_paused():
    """Opening builds several small objects per tensor (over a million for Kimi-K2's 140k tensors),
    none in a reference cycle; the cyclic collector would rescan them again and again as they pile
    up, which took half the opening time."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _fp8_block(config: dict) -> tuple[int, int] | None:
    """Block size of DeepSeek-style FP8 from quantization_config, or None for unquantized models."""
    q = config.get("quantization_config")
    if not isinstance(q, dict):
        return None
    block = q.get("weight_block_size")
    if isinstance(block, (list, tuple)) and len(block) == 2 and all(isinstance(b, int) and b > 0 for b in block):
        return (int(block[0]), int(block[1]))
    if q.get("quant_method") == "fp8":
        return fp8.DEFAULT_BLOCK
    return None
