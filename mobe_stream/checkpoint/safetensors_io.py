"""Safetensors header parsing with strict validation, and streaming atomic shard/JSON writes.

We parse headers ourselves (instead of letting safetensors fail later) so that a corrupt or
truncated shard is refused up front with a one-line message naming the file and the problem.
Writing streams each tensor's bytes straight from its storage, so a shard is never assembled in
RAM, and goes through `<name>.tmp-<pid>` + fsync + rename so a crash never leaves a half shard.
"""

from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import struct
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass, field
from operator import attrgetter
from pathlib import Path
from typing import NamedTuple

import torch

from .. import faults
from ..errors import CheckpointError

# safetensors dtype string -> torch dtype. Item sizes come from the torch dtype.
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U64": torch.uint64,
    "U32": torch.uint32,
    "U16": torch.uint16,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}
ITEMSIZE: dict[str, int] = {k: torch.empty((), dtype=v).element_size() for k, v in ST_TO_TORCH.items()}

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the safetensors library refuses larger headers too
WRITE_CHUNK = 64 * 1024 * 1024
READ_CHUNK = 8 * 1024 * 1024
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)  # errors only the file being written can cause


class HeaderEntry(NamedTuple):
    """One tensor as described by a shard header; `begin`/`end` are relative to the data section.
    (A tuple: Kimi-K2 has 140k of them and a frozen dataclass took a second to build.)"""

    name: str
    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


@dataclass
class ShardHeader:
    """A validated header: tensors in file order, metadata, and the raw bytes (for fingerprints)."""

    path: Path
    file_size: int
    data_start: int  # 8 + header length
    tensors: dict[str, HeaderEntry]
    metadata: dict[str, str] = field(default_factory=dict)
    raw: bytes = b""  # the 8 length bytes + JSON header, exactly as stored

    @property
    def data_bytes(self) -> int:
        return self.file_size - self.data_start


def _fail(path: Path, message: str) -> CheckpointError:
    return CheckpointError(message, path)


def read_header(path: str | os.PathLike) -> ShardHeader:
    """Read and validate a shard header without touching the data section."""
    path = Path(path)
    try:
        file_size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise _fail(path, f"truncated: file is {file_size} bytes, shorter than the 8-byte header length")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES:
                raise _fail(path, f"corrupt header: length field says {n} bytes (limit {MAX_HEADER_BYTES})")
            if 8 + n > file_size:
                raise _fail(path, f"truncated: header says it ends at {8 + n} bytes but file is {file_size} bytes")
            body = f.read(n)
    except OSError as e:
        raise _fail(path, f"cannot read shard ({e.strerror or e})") from e
    try:
        doc = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _fail(path, f"corrupt header: not valid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise _fail(path, "corrupt header: JSON is not an object")
    metadata = doc.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _fail(path, "corrupt header: __metadata__ is not an object")
    entries = [_entry(path, name, spec) for name, spec in doc.items()]
    end = 8 + n + max((ent.end for ent in entries), default=0)
    if end > file_size:  # checked before the per-tensor sizes: a cut file is the likelier story
        raise _fail(path, f"truncated: header says data ends at {end} bytes but file is {file_size} bytes")
    for ent in entries:
        want = math.prod(ent.shape) * ITEMSIZE[ent.dtype]
        if ent.end - ent.begin != want:
            raise _fail(path, f"corrupt header: tensor {ent.name} data_offsets [{ent.begin}, {ent.end}] span "
                              f"{ent.nbytes} bytes but {ent.dtype}{list(ent.shape)} needs {want}")
    entries.sort(key=attrgetter("begin", "end"))
    _check_layout(path, entries, 8 + n, file_size)
    return ShardHeader(path, file_size, 8 + n, {e.name: e for e in entries}, metadata, head + body)


def _entry(path: Path, name: str, spec: object) -> HeaderEntry:
    # `type(x) is int` rather than isinstance: it also refuses bool, and this runs 140k times on Kimi-K2
    if type(spec) is not dict:
        raise _fail(path, f"corrupt header: entry for tensor {name} is not an object")
    dtype, shape, offsets = spec.get("dtype"), spec.get("shape"), spec.get("data_offsets")
    if dtype not in ITEMSIZE:
        raise _fail(path, f"tensor {name} has unknown dtype {dtype!r}")
    if type(shape) is not list or not all(type(s) is int and s >= 0 for s in shape):
        raise _fail(path, f"corrupt header: tensor {name} has invalid shape {shape!r}")
    if (type(offsets) is not list or len(offsets) != 2 or type(offsets[0]) is not int or type(offsets[1]) is not int
            or not 0 <= offsets[0] <= offsets[1]):
        raise _fail(path, f"corrupt header: tensor {name} has invalid data_offsets {offsets!r}")
    return HeaderEntry(name, dtype, tuple(shape), offsets[0], offsets[1])


def _check_layout(path: Path, entries: list[HeaderEntry], data_start: int, file_size: int) -> None:
    """Tensors (sorted by offsets) must tile the data section exactly: no overlap, no hole, nothing past the end."""
    pos = 0
    prev = None
    for e in entries:
        if e.begin < pos:
            raise _fail(path, f"corrupt header: tensor {e.name} (bytes {e.begin}-{e.end}) overlaps {prev}")
        if e.begin > pos:
            raise _fail(path, f"corrupt header: {e.begin - pos} unused bytes before tensor {e.name} at {pos}")
        pos, prev = e.end, e.name
    end = data_start + pos
    if end < file_size:
        raise _fail(path, f"corrupt: header says data ends at {end} bytes but file is {file_size} bytes "
                          f"({file_size - end} unexpected trailing bytes)")


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return  # platforms without directory fds
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _tmp_path(path: Path) -> Path:
    return path.with_name(f"{path.name}.tmp-{os.getpid()}")


def _tensor_bytes(t: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a contiguous CPU tensor (copies only if it is not contiguous/CPU)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    flat = t.contiguous().reshape(-1)
    if flat.numel() == 0:
        return memoryview(b"")
    return flat.view(torch.uint8).numpy().data.cast("B")


def _header_bytes(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    for name, dtype, _ in entries:
        if dtype not in TORCH_TO_ST:
            raise ValueError(f"tensor {name} has dtype {dtype}, which safetensors cannot store")
    return encode_header([(name, TORCH_TO_ST[dtype], shape) for name, dtype, shape in entries], metadata)


def encode_header(entries: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None = None) -> bytes:
    """The 8 length bytes + JSON header for tensors (name, safetensors dtype, shape) stored in this order."""
    doc: dict[str, object] = {}
    if metadata:
        doc["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    pos = 0
    for name, dtype, shape in entries:
        if name in doc or name == "__metadata__":
            raise ValueError(f"duplicate or reserved tensor name {name!r}")
        nbytes = math.prod(shape) * ITEMSIZE[dtype]
        doc[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [pos, pos + nbytes]}
        pos += nbytes
    body = json.dumps(doc, separators=(",", ":")).encode("utf-8")
    body += b" " * (-len(body) % 8)  # keep the data section 8-byte aligned, as safetensors does
    return struct.pack("<Q", len(body)) + body


@contextmanager
def atomic_file(path: str | os.PathLike):
    """Open `path.tmp-<pid>` for writing; on success fsync it, rename it over `path` and fsync the
    directory, so readers see the old file or the new one, never a mix. On failure the temporary
    file is removed (a disk-full error leaves nothing under a final name) and an OSError names
    `path` when the disk is full (a write error itself names no file, the temporary name means
    nothing to the user)."""
    path = Path(path)
    tmp = _tmp_path(path)
    try:
        with open(tmp, "wb") as f:
            yield f
            faults.on_atomic_write(path)  # test-only ENOSPC injection for one named file
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        # a full disk names the file the user knows, not our temporary (a write error names none)
        if e.errno in _WRITE_ERRNOS and e.filename in (None, str(tmp)):
            raise OSError(e.errno, e.strerror, str(path)) from e
        raise
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def write_safetensors(path: str | os.PathLike, items: list[tuple[str, torch.Tensor]],
                      metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """Write a shard atomically, streaming tensor bytes; returns (sha256 hex, size in bytes)."""
    return stream_safetensors(path, [(n, t.dtype, tuple(t.shape)) for n, t in items], (t for _, t in items), metadata)


def stream_safetensors(path: str | os.PathLike, entries: list[tuple[str, torch.dtype, tuple[int, ...]]],
                       tensors: Iterable[torch.Tensor], metadata: dict[str, str] | None = None) -> tuple[str, int]:
    """write_safetensors with the tensors produced one at a time (`entries`: name, dtype, shape of
    each, for the header), so only one is in memory at once; each is checked against its entry."""
    header = _header_bytes(entries, metadata)
    sha = hashlib.sha256()
    size = 0
    with atomic_file(path) as f:
        f.write(header)
        sha.update(header)
        size += len(header)
        faults.on_bytes_written(len(header), f.name)
        for (name, dtype, shape), t in zip(entries, tensors, strict=True):
            if t.dtype != dtype or tuple(t.shape) != shape:
                raise ValueError(f"tensor {name} is {t.dtype} {list(t.shape)}, its header says {dtype} {list(shape)}")
            mv = _tensor_bytes(t)
            for i in range(0, len(mv), WRITE_CHUNK):
                chunk = mv[i:i + WRITE_CHUNK]
                f.write(chunk)
                sha.update(chunk)
                faults.on_bytes_written(len(chunk), f.name)  # test-only ENOSPC injection
            size += len(mv)
            del mv, t
    return sha.hexdigest(), size


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replace `path` with `data` atomically (see atomic_file)."""
    with atomic_file(path) as f:
        f.write(data)


def atomic_write_json(path: str | os.PathLike, obj: object, indent: int | None = 2) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent) + "\n").encode("utf-8"))


def sha256_file(path: str | os.PathLike, chunk: int = READ_CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()

