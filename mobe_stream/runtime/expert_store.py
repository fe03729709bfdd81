"""Execution of `--device-map experts` (plan: expert_plan.py): non-expert weights resident on the
compute device, routed experts fetched per forward through a byte-bounded LRU of hot experts.

Host side per MoE layer: "cpu" experts are one UnitWeights of the layer's expert tensors (FP8 as
stored; pinned when a GPU computes), sliced per expert without a copy; "disk" experts are read per
expert through the source shards' mmap (CheckpointReader.get / get_expert: only that expert's bytes).

Per MoE forward the bank calls `prepare_experts(routed)`: cached experts are hits; the misses are
copied to the device in batches of at most `staging` bytes (top_k experts' worth: a decode step's
misses in one batch, a prefill's in a few), on CUDA from pinned memory with non_blocking copies on
a side stream that the compute stream waits for. A batch's experts go into the cache (evicting the
least recently used by bytes) and stay referenced until the next batch replaces them, so device
memory stays within resident + staging + cache. On the CPU the device and the host are the same
memory; the same path runs (the cache then holds copies), which is how the tests exercise it.
"""

from __future__ import annotations

import torch

from ..checkpoint.reader import CheckpointReader
from .config import RuntimeConfig
from .device_map import Device
from .expert_plan import CACHE_KEY, STAGING_KEY, LayerExperts, experts_key, layer_experts
from .lru import ByteLRU
from .unit_weights import UnitWeights
from .weights import build_unit, build_weights, unit_names, unit_scales, unit_tensors

Entry = UnitWeights  # one expert's tensors on the device, keyed as the unit names them (stacked: slice e)


class HostExperts:
    """One layer's routed experts where they live between uses (cpu RAM or the source shards)."""

    def __init__(self, reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype, info: LayerExperts,
                 where: Device, pin: bool):
        self.reader, self.cfg, self.dtype, self.info = reader, cfg, dtype, info
        unit = f"layers.{info.layer}"
        self.tensors = {rel: n for rel, n in unit_tensors(reader, cfg, unit).items()
                        if rel in info.per_expert or rel in info.stacked}
        self.scales = unit_scales(reader, self.tensors)
        self.by_expert: dict[int, list[str]] = {}
        for rel, e in info.per_expert.items():
            self.by_expert.setdefault(e, []).append(rel)
        self.held: UnitWeights | None = None
        if where == "cpu":
            self.held = build_unit(reader, cfg, unit, dtype, reader.get, copy=True, only=self.tensors)
            if pin:
                self.held = self.held.map(lambda v: v.pin_memory())

    def shape(self, rel: str) -> torch.Size:
        return torch.Size(self.reader.info(self.tensors[rel]).shape)

    def read(self, e: int) -> UnitWeights:
        """Expert e's tensors on the host (views of held RAM, or fresh reads of the shards)."""
        rels = self.by_expert.get(e, []) + self.info.stacked
        if self.held is not None:
            h = self.held
            return UnitWeights({r: h.tensors[r] if r in self.info.per_expert else h.tensors[r][e] for r in rels},
                               {r: h.scales[r] if r in self.info.per_expert else h.scales[r][e] for r in rels if r in h.scales},
                               self.dtype, h.block)
        stacked_names = {self.tensors[r] for r in self.info.stacked} | {self.scales[r] for r in self.info.stacked
                                                                        if r in self.scales}

        def read(name: str) -> torch.Tensor:
            return self.reader.get_expert(name, e) if name in stacked_names else self.reader.get(name)

        return build_weights(self.reader, self.cfg, {r: self.tensors[r] for r in rels},
                             {r: self.scales[r] for r in rels if r in self.scales}, self.dtype, read, copy=False)


class ExpertFetcher:
    """Moves routed experts of one layer to the device, a bank's batch at a time, through the shared cache."""

    def __init__(self, layer: int, host: HostExperts, cache: ByteLRU[Entry], device: torch.device, staging: int,
                 stats: dict[str, int], stream):
        self.layer, self.host, self.cache, self.device, self.staging = layer, host, cache, device, staging
        self.stats, self.stream = stats, stream
        self.batch: dict[int, Entry] = {}
        self.max_batch = max(1, staging // max(host.info.max_expert_bytes, 1))  # experts held at once

    def prepare(self, experts: list[int]) -> None:
        """Count each routed expert once against the cache (a hit, or a miss that will travel)."""
        self.batch = {}
        for e in experts:
            self.cache.get((self.layer, e))

    def hold(self, experts: list[int]) -> list[Entry]:
        """The entries of `experts` (at most max_batch), on the device until the next hold: from the
        batch held, the cache, or copied now in one batch."""
        held: dict[int, Entry] = {}
        missing = []
        for e in experts:
            ent = self.batch.get(e)
            if ent is None:
                ent = self.cache.peek((self.layer, e))
            if ent is None:
                missing.append(e)
            else:
                held[e] = ent
        if missing:
            held.update(self._load(missing))
        self.batch = held
        return [held[e] for e in experts]

    def _load(self, experts: list[int]) -> dict[int, Entry]:
        host = [(e, self.host.read(e)) for e in experts]
        if self.stream is not None:
            with torch.cuda.stream(self.stream):
                moved = [(e, w.map(lambda v: (v if v.is_pinned() else v.pin_memory()).to(self.device, non_blocking=True)))
                         for e, w in host]
                ev = torch.cuda.Event()
                ev.record(self.stream)
            cur = torch.cuda.current_stream(self.device)
            cur.wait_event(ev)
            for _, w in moved:
                for t in w.stored():
                    t.record_stream(cur)
        else:
            moved = [(e, w.map(lambda v: v.to(self.device, copy=True))) for e, w in host]
        for e, w in moved:
            self.cache.put((self.layer, e), w, w.nbytes())
        self.stats["transferred_bytes"] += sum(w.nbytes() for _, w in host)
        self.stats["transfers"] += len(moved)
        return dict(moved)


class ExpertUnit(UnitWeights):
    """A decoder layer whose non-expert tensors are resident and whose routed experts are fetched."""

    def __init__(self, resident: UnitWeights, fetcher: ExpertFetcher):
        super().__init__(resident.tensors, resident.scales, resident.dtype, resident.block)
        self.fetcher = fetcher
        info = fetcher.host.info
        self.per_expert, self.stacked = info.per_expert, set(info.stacked)

        self.max_batch = fetcher.max_batch

    def __getitem__(self, rel: str) -> torch.Tensor:
        e = self.per_expert.get(rel)
        return super().__getitem__(rel) if e is None else self.fetcher.hold([e])[0][rel]

    def expert(self, rel: str, e: int) -> torch.Tensor:
        return self.fetcher.hold([e])[0][rel] if rel in self.stacked else super().expert(rel, e)

    def experts(self, rel: str, ids: torch.Tensor) -> torch.Tensor:
        if rel not in self.stacked:
            return super().experts(rel, ids)
        return self._gather(self.fetcher.hold(ids.tolist()), [rel] * len(ids))

    def stack(self, rels: list[str]) -> torch.Tensor:
        if rels[0] not in self.per_expert:
            return super().stack(rels)
        return self._gather(self.fetcher.hold([self.per_expert[r] for r in rels]), rels)

    def _gather(self, entries: list[UnitWeights], rels: list[str]) -> torch.Tensor:
        """One tensor per fetched expert entry, stacked, FP8 ones dequantized in one pass."""
        q = torch.stack([ent.tensors[r] for ent, r in zip(entries, rels, strict=True)])
        if rels[0] not in entries[0].scales:
            return q
        return self._dequant(q, torch.stack([ent.scales[r] for ent, r in zip(entries, rels, strict=True)]))

    def shape(self, rel: str) -> torch.Size:
        return self.fetcher.host.shape(rel) if rel in self.stacked or rel in self.per_expert else super().shape(rel)

    def prepare_experts(self, experts: list[int]) -> None:
        self.fetcher.prepare(experts)

    def __contains__(self, rel: object) -> bool:
        return rel in self.tensors or rel in self.per_expert or rel in self.stacked


class ExpertWeightStore:
    """WeightStore's interface (get, device_of, plan, resident_bytes, close) for the experts plan."""

    def __init__(self, reader: CheckpointReader, cfg: RuntimeConfig, dtype: torch.dtype, plan: dict[str, Device],
                 sizes: dict[str, int]):
        self.reader, self.cfg, self.dtype, self.plan = reader, cfg, dtype, plan
        dev = plan[CACHE_KEY]
        self.main_device = torch.device("cuda", dev) if isinstance(dev, int) else torch.device("cpu")
        on_gpu = self.main_device.type == "cuda"
        self.cache: ByteLRU[Entry] = ByteLRU(sizes[CACHE_KEY])
        self.stats = {"transfers": 0, "transferred_bytes": 0}
        stream = torch.cuda.Stream(self.main_device) if on_gpu else None
        self.resident: dict[str, UnitWeights] = {}
        self.host_bytes: dict[str, int] = {}
        for unit in unit_names(cfg):
            info = layer_experts(reader, cfg, dtype, int(unit.split(".")[1])) if unit.startswith("layers.") else None
            if info is not None and on_gpu and plan[experts_key(info.layer)] == dev:
                info = None  # experts planned whole on the GPU: a plain resident unit, nothing travels
            skip = set(info.per_expert) | set(info.stacked) if info else set()
            keep = [rel for rel in unit_tensors(reader, cfg, unit) if rel not in skip]
            w = build_unit(reader, cfg, unit, dtype, reader.get, copy=True, only=keep)
            if on_gpu:
                w = w.map(lambda v: v.to(self.main_device))
            if info is not None:
                where = plan[experts_key(info.layer)]
                host = HostExperts(reader, cfg, dtype, info, where, pin=on_gpu)
                self.host_bytes[str(where)] = self.host_bytes.get(str(where), 0) + (
                    host.held.nbytes() if host.held is not None else 0)
                w = ExpertUnit(w, ExpertFetcher(info.layer, host, self.cache, self.main_device, sizes[STAGING_KEY],
                                                self.stats, stream))
            self.resident[unit] = w

    def get(self, unit: str) -> UnitWeights:
        return self.resident[unit]

    def device_of(self, unit: str) -> torch.device:
        return self.main_device

    def resident_bytes(self) -> dict[str, int]:
        out = dict(self.host_bytes)
        key = str(self.plan[CACHE_KEY])
        out[key] = out.get(key, 0) + sum(w.nbytes() for w in self.resident.values()) + self.cache.bytes
        return out

    def expert_stats(self) -> dict:
        """Hits / misses of routed experts against the device cache (a miss is one expert transfer)."""
        c = self.cache
        looked = c.hits + c.misses
        return {"hits": c.hits, "misses": c.misses, "hit_rate": c.hits / looked if looked else 0.0,
                "evictions": c.evictions, "cache_bytes": c.bytes, "cache_max_bytes": c.max_bytes,
                "cached_experts": len(c), **self.stats}

    def close(self) -> None:
        self.resident.clear()
        self.cache = ByteLRU(0)
