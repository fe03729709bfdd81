"""Where each unit's weights live between forwards, and bringing offloaded ones in just in time.

  GPU unit     resident on its GPU.
  "cpu" unit   resident in host RAM (pinned when a GPU computes); copied to the GPU just in time.
  "disk" unit  not resident: read straight from the checkpoint's own safetensors shards through
               their mmap, every time it runs. FP8 weights travel as stored and are dequantized at
               use; other dtype casts happen on the fetch, or, with an offload folder, once: the
               tensors that need a cast are kept there in the compute dtype, across runs
               (offload_folder.py).

Everywhere, FP8 weights are held as stored (1 byte per parameter + fp32 block scales) in a
UnitWeights, which dequantizes a matrix (or one routed expert) when the compute reads it.

While one unit computes, a single background thread fetches the next offloaded unit (on CUDA into
pinned memory and onto the GPU on a side stream), so I/O overlaps compute. accelerate fetches
synchronously, which is why its disk offload is slow.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors import safe_open

from ..checkpoint.reader import CheckpointReader
from .config import RuntimeConfig
from .device_map import Device, Warn
from .offload_folder import OffloadFolder
from .unit_weights import UnitWeights
from .weights import build_unit, load_unit

Weights = UnitWeights


class WeightStore:
    def __init__(self, reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype, plan: dict[str, Device],
                 offload_folder: str | Path | None = None, prefetch: bool = True, warn: Warn | None = None):
        """offload_folder: where disk units' tensors stored in another dtype are kept cast to the
        compute dtype (OffloadFolder; written once, reused by later runs); None: cast on every fetch."""
        self.reader, self.cfg, self.dtype, self.plan = reader, cfg, dtype, plan
        disk = [u for u, d in plan.items() if d == "disk"]
        self.offload = OffloadFolder(offload_folder, reader, cfg, dtype, disk, warn) if offload_folder else None
        self.has_gpu = any(isinstance(d, int) for d in plan.values()) or (
            torch.cuda.is_available() and any(d != "cpu" for d in plan.values()))
        self.main_device = torch.device("cuda", min((d for d in plan.values() if isinstance(d, int)), default=0)) \
            if self.has_gpu else torch.device("cpu")
        self.order = list(plan)
        self.offloaded = [u for u in self.order if self._is_offloaded(u)]
        self.resident: dict[str, Weights] = {}
        self._handles: dict[Path, safe_open] = {}  # mmapped shards (page cache, not private RAM)
        for unit, dev in plan.items():
            if dev == "disk":
                continue
            w = load_unit(reader, cfg, unit, dtype)
            if isinstance(dev, int):
                cuda = torch.device("cuda", dev)
                w = w.map(lambda v: v.to(cuda))  # noqa: B023 (map() applies it at once, inside this iteration)
            elif self.has_gpu:
                w = w.map(lambda v: v.pin_memory())
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

    def _read_stored(self, name: str) -> torch.Tensor:
        """A tensor as stored, or as the offload folder keeps it cast: a view of its file's mmap (the
        handle is kept open: a fresh mapping per read would page-fault every page again). A tensor no
        shard holds under its name (MXFP4) comes dense from the reader."""
        if self.reader.is_derived(name) and not (self.offload and name in self.offload.paths):
            return self.reader.get(name)
        path = (self.offload.paths.get(name) if self.offload else None) or self.reader.shard_path(self.reader.info(name).shard)
        f = self._handles.get(path)
        if f is None:
            f = self._handles[path] = safe_open(str(path), framework="pt", device="cpu")
        return f.get_tensor(name)

    def _read_disk(self, unit: str) -> Weights:
        w = build_unit(self.reader, self.cfg, unit, self.dtype, self._read_stored, copy=False)
        w.tensors = {k: v if k in w.scales else _aligned(v) for k, v in w.tensors.items()}
        return w

    # ---- fetching ------------------------------------------------------------------------------

    def _fetch(self, unit: str):
        """Runs on the prefetch thread: the unit's weights on its compute device (+ a CUDA event)."""
        w = self.resident[unit] if unit in self.resident else self._read_disk(unit)
        if not self.has_gpu:
            return w, None
        with torch.cuda.stream(self._stream):
            dev = self.device_of(unit)
            w = w.map(lambda v: (v if v.is_pinned() else v.pin_memory()).to(dev, non_blocking=True))
            ev = torch.cuda.Event()
            ev.record(self._stream)
        return w, ev

    def get(self, unit: str) -> Weights:
        """Weights of `unit` ready for compute; starts fetching the next offloaded unit."""
        if unit not in self.offloaded:
            return self.resident[unit]
        assert self._pool is not None  # created whenever a unit is offloaded
        fut = self._pending.pop(unit, None) or self._pool.submit(self._fetch, unit)
        w, ev = fut.result()
        if ev is not None:
            cur = torch.cuda.current_stream(self.device_of(unit))
            cur.wait_event(ev)
            for t in w.stored():
                t.record_stream(cur)
        if self.prefetch:
            i = self.offloaded.index(unit)
            nxt = self.offloaded[(i + 1) % len(self.offloaded)]
            if nxt != unit and nxt not in self._pending:
                self._pending[nxt] = self._pool.submit(self._fetch, nxt)
        return w

    def close(self) -> None:
        if self._pool is not None:
            for f in self._pending.values():
                f.cancel()
            self._pending.clear()
            self._pool.shutdown(wait=True)
            self._pool = None
        self._handles.clear()


def _aligned(t: torch.Tensor, align: int = 64) -> torch.Tensor:
    """mmap views start wherever the tensor sits in the file; CPU GEMM kernels pick different (and
    differently rounding) code paths for unaligned data, so misaligned views are copied. Aligned
    ones stay zero-copy views of the page cache."""
    return t if t.data_ptr() % align == 0 else t.clone()
