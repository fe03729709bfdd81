"""Where each unit's weights live between forwards, and bringing offloaded ones in just in time.

  GPU unit     resident on its GPU.
  "cpu" unit   resident in host RAM (pinned when a GPU computes); copied to the GPU just in time.
  "disk" unit  not resident: read straight from the checkpoint's safetensors mmap (no copy of the
               checkpoint). Only tensors that need conversion (FP8 dequantized, or a dtype cast) are
               written once to the offload folder as `<unit>.safetensors` and mmapped from there.

While one unit computes, a single background thread fetches the next offloaded unit (on CUDA into
pinned memory and onto the GPU on a side stream), so I/O overlaps compute. accelerate fetches
synchronously, which is why its disk offload is slow.
"""

from __future__ import annotations

import tempfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..checkpoint.reader import CheckpointReader
from .config import RuntimeConfig
from .device_map import Device
from .weights import load_unit, needs_conversion, stored_dtype, target_dtype, unit_tensors

Weights = dict[str, torch.Tensor]


class WeightStore:
    def __init__(self, reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype, plan: dict[str, Device],
                 offload_folder: str | Path | None = None, prefetch: bool = True):
        self.reader, self.cfg, self.dtype, self.plan = reader, cfg, dtype, plan
        self.has_gpu = any(isinstance(d, int) for d in plan.values()) or (
            torch.cuda.is_available() and any(d != "cpu" for d in plan.values()))
        self.main_device = torch.device("cuda", min((d for d in plan.values() if isinstance(d, int)), default=0)) \
            if self.has_gpu else torch.device("cpu")
        self.order = list(plan)
        self.offloaded = [u for u in self.order if self._is_offloaded(u)]
        self.resident: dict[str, Weights] = {}
        self.disk_src: dict[str, dict[str, tuple[Path, str]]] = {}
        self._handles: dict[Path, object] = {}  # mmapped shard / offload files (page cache, not private RAM)
        self._tmp = None
        self.folder = Path(offload_folder) if offload_folder else None
        self.offload_bytes_written = 0
        for unit, dev in plan.items():
            if dev == "disk":
                self.disk_src[unit] = self._prepare_disk(unit)
            else:
                w = load_unit(reader, cfg, unit, dtype)
                if isinstance(dev, int):
                    w = {k: v.to(torch.device("cuda", dev)) for k, v in w.items()}
                elif self.has_gpu:
                    w = {k: v.pin_memory() for k, v in w.items()}
                self.resident[unit] = w
        self.prefetch = prefetch and bool(self.offloaded)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="mobe-prefetch") if self.offloaded else None
        self._pending: dict[str, Future] = {}
        self._stream = torch.cuda.Stream(self.main_device) if self.has_gpu and self.offloaded else None

    def _is_offloaded(self, unit: str) -> bool:
        d = self.plan[unit]
        return d == "disk" or (d == "cpu" and self.has_gpu)

    def device_of(self, unit: str) -> torch.device:
        d = self.plan[unit]
        return torch.device("cuda", d) if isinstance(d, int) else self.main_device

    # ---- disk ----------------------------------------------------------------------------------

    def _prepare_disk(self, unit: str) -> dict[str, tuple[Path, str]]:
        """Point at the source shard for tensors usable as stored; convert the rest once to the folder."""
        src, convert = {}, {}
        for rel, name in unit_tensors(self.reader, self.cfg, unit).items():
            if needs_conversion(self.reader, self.cfg, rel, name, self.dtype):
                st = stored_dtype(self.reader, name)
                convert[rel] = self.reader.get(name, target_dtype(self.cfg, rel, st, self.dtype)).contiguous()
            else:
                src[rel] = (self.reader.shard_path(self.reader.info(name).shard), name)
        if convert:
            if self.folder is None:
                self._tmp = self._tmp or tempfile.TemporaryDirectory(prefix="mobe-offload-")
                self.folder = Path(self._tmp.name)
            self.folder.mkdir(parents=True, exist_ok=True)
            path = self.folder / f"{unit}.safetensors"
            save_file(convert, str(path))
            self.offload_bytes_written += path.stat().st_size
            src.update({rel: (path, rel) for rel in convert})
        return src

    def _read_disk(self, unit: str) -> Weights:
        by_file: dict[Path, list[tuple[str, str]]] = {}
        for rel, (path, name) in self.disk_src[unit].items():
            by_file.setdefault(path, []).append((rel, name))
        out = {}
        for path, items in by_file.items():
            f = self._handles.get(path)
            if f is None:  # kept open: a fresh mapping per read would page-fault every page again
                f = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
            for rel, name in items:
                out[rel] = _aligned(f.get_tensor(name))
        return out

    # ---- fetching ------------------------------------------------------------------------------

    def _fetch(self, unit: str):
        """Runs on the prefetch thread: the unit's weights on its compute device (+ a CUDA event)."""
        w = self.resident.get(unit) or self._read_disk(unit)
        if not self.has_gpu:
            return w, None
        with torch.cuda.stream(self._stream):
            dev = self.device_of(unit)
            w = {k: (v if v.is_pinned() else v.pin_memory()).to(dev, non_blocking=True) for k, v in w.items()}
            ev = torch.cuda.Event()
            ev.record(self._stream)
        return w, ev

    def get(self, unit: str) -> Weights:
        """Weights of `unit` ready for compute; starts fetching the next offloaded unit."""
        if unit not in self.offloaded:
            return self.resident[unit]
        fut = self._pending.pop(unit, None) or self._pool.submit(self._fetch, unit)
        w, ev = fut.result()
        if ev is not None:
            cur = torch.cuda.current_stream(self.device_of(unit))
            cur.wait_event(ev)
            for t in w.values():
                t.record_stream(cur)
        if self.prefetch:
            i = self.offloaded.index(unit)
            nxt = self.offloaded[(i + 1) % len(self.offloaded)]
            if nxt != unit and nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._fetch, nxt)
        return w

    def resident_bytes(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for unit, w in self.resident.items():
            key = str(self.plan[unit])
            out[key] = out.get(key, 0) + sum(t.numel() * t.element_size() for t in w.values())
        return out

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._handles.clear()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None


def _aligned(t: torch.Tensor, align: int = 64) -> torch.Tensor:
    """mmap views start wherever the tensor sits in the file; CPU GEMM kernels pick different (and
    differently rounding) code paths for unaligned data, so misaligned views are copied. Aligned
    ones stay zero-copy views of the page cache."""
    return t if t.data_ptr() % align == 0 else t.clone()
