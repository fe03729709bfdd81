"""accelerate-style device map: which device holds each unit (embed, layers.N, norm, lm_head).

What users write, in accelerate's and transformers' vocabulary:

  --device-map  a strategy: auto, balanced, balanced_low_0, sequential (plan_device_map); one device
                for everything: cpu, cuda, cuda:N or a GPU index N; or a JSON file {module: device}
                with transformers' module names (model.embed_tokens, model.layers.N, model.norm,
                lm_head) or ours (embed, layers.N, norm, lm_head), a prefix ("model", "model.layers",
                "") covering what is under it (explicit_map)
  --max-memory  "0=20GiB,cpu=64GiB,disk", a JSON object {"0": "20GiB", "cpu": "64GiB", "disk": null}
                or a .json file holding one; sizes as sizes.parse_size reads them, ints are bytes,
                a device without a size (null) is unbounded (parse_max_memory)

Strategies are greedy in module order; a decoder layer is never split; on every device that has a
later device to offload to, room for the largest unit stays free so an offloaded unit can be brought
in to run. GPUs (ints) first, then "cpu", then "disk". Disk is the last resort: when the devices
max_memory names (or the free memory found, without it) cannot hold every unit and max_memory does
not name disk, the rest goes to disk with one warning, as accelerate does (it always appends disk).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

from ..checkpoint.reader import no_duplicate_keys
from ..errors import ConfigError, ResourceError, warning
from ..sizes import parse_size

Device = int | str
Warn = Callable[[str], None]

STRATEGIES = ("auto", "balanced", "balanced_low_0", "sequential")
# transformers' module names of our units (a decoder layer N is model.layers.N)
HF_NAMES = {"embed": "model.embed_tokens", "norm": "model.norm", "lm_head": "lm_head"}
NO_WEIGHTS = ("model.rotary_emb",)  # in transformers' device maps; its buffers are computed here, not stored
_FORMS = ("auto, balanced, balanced_low_0, sequential, experts, one device (cpu, cuda, cuda:N, N) "
          "or a JSON file mapping modules to devices")


def parse_device(value: object, what: str, path: str | Path | None = None) -> Device:
    """accelerate's device names: a GPU index (0, "0", "cuda", "cuda:0" -> 0), "cpu" or "disk"."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    if isinstance(value, str):
        k = value.strip().lower()
        if k in ("cpu", "disk"):
            return k
        k = "0" if k == "cuda" else k.removeprefix("cuda:")
        if k.isascii() and k.isdigit():
            return int(k)
    raise ConfigError(f"unknown device {value!r} in {what} (use a GPU index N, cuda:N, cpu or disk)", path)


def _json_object(spec: str, what: str, any_file: bool) -> tuple[dict, Path | None] | None:
    """`spec` as a JSON object: inline ("{...}"; "[" too, to say it is not an object) or a file (a
    .json name, or with any_file any file that exists); None when it is neither. Errors name the file."""
    text, path = spec.strip(), None
    if not text.startswith(("{", "[")):
        p = Path(text).expanduser()
        if not (text.lower().endswith(".json") or (any_file and p.is_file())):
            return None
        path = p
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {what} file ({getattr(e, 'strerror', None) or e})", p) from None
    try:
        obj = json.loads(text, object_pairs_hook=no_duplicate_keys)
    except json.JSONDecodeError as e:
        raise ConfigError(f"{what}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})", path) from None
    except ValueError as e:
        raise ConfigError(f"{what}: {e}", path) from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{what}: expected a JSON object {{device: size}} or {{module: device}}, got {type(obj).__name__}",
                          path)
    return obj, path


def parse_max_memory(spec: str | dict | None) -> dict[Device, float]:
    """"0=20GiB,cpu=64GiB,disk", '{"0": "20GiB", "cpu": "64GiB", "disk": null}', a .json file of
    that object, or a dict -> {0: 21474836480, "cpu": ..., "disk": inf}."""
    if spec is None:
        return {}
    path = None
    if isinstance(spec, dict):
        items = [(str(k), v) for k, v in spec.items()]
    elif (loaded := _json_object(spec, "--max-memory", any_file=False)) is not None:
        obj, path = loaded
        items = list(obj.items())
    else:
        items = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            k, _, v = part.partition("=")
            items.append((k, v or None))
    out: dict[Device, float] = {}
    for k, v in items:
        d = parse_device(k, "max_memory", path)
        if d in out:
            raise ConfigError(f"max_memory names device {d} twice ({k!r})", path)
        if v is None or v == "" or v == math.inf:
            out[d] = math.inf
        elif isinstance(v, (str, int, float)) and not isinstance(v, bool):
            try:
                out[d] = parse_size(v, f"max_memory[{k}]", allow_zero=True)
            except ConfigError as e:
                raise ConfigError(str(e), path) from None
        else:
            raise ConfigError(f"max_memory[{k}]: expected a size (e.g. \"20GiB\"), a number of bytes or null, "
                              f"got {json.dumps(v)}", path)
    return out


def default_max_memory() -> dict[Device, float]:
    """Free memory of each GPU (90% when there is exactly one) and psutil's available RAM."""
    import psutil
    import torch

    mem: dict[Device, float] = {}
    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        for i in range(n):
            free, _ = torch.cuda.mem_get_info(i)
            mem[i] = int(free * 0.9) if n == 1 else free
    mem["cpu"] = psutil.virtual_memory().available
    return mem


def check_gpus(devices, what: str) -> None:
    """Refuse GPU indices this machine does not have, before anything is placed on them (planning
    alone, e.g. --dry-run for a bigger machine, never calls this)."""
    import torch

    gpus = sorted({d for d in devices if isinstance(d, int)})
    if not gpus:
        return
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n == 0:
        raise ConfigError(f"{what} names GPU {gpus[0]} but no CUDA device is available "
                          f"(plan for another machine with --dry-run --print-device-map)")
    if gpus[-1] >= n:
        raise ConfigError(f"{what} names GPU {gpus[-1]} but only {n} GPUs are available (indices 0-{n - 1})")


# ---- explicit maps --------------------------------------------------------------------------------


def _names(unit: str) -> tuple[str, ...]:
    """The names a device map may give a unit: ours, then transformers' module name."""
    hf = HF_NAMES.get(unit, f"model.{unit}")
    return (unit, hf) if hf != unit else (unit,)


def _prefixes(name: str) -> list[str]:
    """"model.layers.3" -> ["model.layers.3", "model.layers", "model"] (most specific first)."""
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(len(parts), 0, -1)]


def explicit_map(mapping: dict, units: list[str], source: str | Path | None = None) -> dict[str, Device]:
    """unit -> device from {module name: device}, as accelerate reads a device_map dict: the most
    specific key covering a unit wins ("" covers everything). Every unit must be covered; a key that
    names no unit (or part of one: a decoder layer is never split) or a device that is not one is an
    error naming `source`."""
    known = {"", *NO_WEIGHTS} | {p for u in units for n in _names(u) for p in _prefixes(n)}
    devices: dict[str, Device] = {}
    for key, value in mapping.items():
        if not isinstance(key, str) or key not in known:
            inside = next((u for u in units for n in _names(u) if isinstance(key, str) and key.startswith(n + ".")), None)
            layers = [u for u in units if u.startswith("layers.")]
            why = (f"it is part of {inside}, and a decoder layer (unit) is never split" if inside else
                   f"the units are embed, {layers[0]}-{layers[-1].split('.')[1]}, norm, lm_head (transformers: "
                   f"model.embed_tokens, model.layers.N, model.norm, lm_head) and prefixes of them")
            raise ConfigError(f"device map places unknown module {key!r}: {why}", source)
        devices[key] = parse_device(value, f"the device map's entry {key!r}", source)
    plan: dict[str, Device] = {}
    for unit in units:
        # (distance from the unit's own name, order in the map): the closest key wins; "" is the farthest
        order = list(devices)
        found = [(i, order.index(p), p) for n in _names(unit) for i, p in enumerate(_prefixes(n)) if p in devices]
        if "" in devices:
            found.append((len(unit) + 9, 0, ""))  # farther than any prefix
        if not found:
            raise ConfigError(f"device map does not place {unit} ({_names(unit)[-1]}): every unit needs a device "
                              f"(name it, or a prefix covering it such as \"model\")", source)
        plan[unit] = devices[min(found)[2]]
    return plan


def resolve_device_map(spec: str | dict | None, units: list[str], device: str | None = None) -> str | dict[str, Device]:
    """What a --device-map names: a strategy (returned lower-cased, for plan_device_map), or unit ->
    device (one device for everything, an explicit map, or None: `device`, else cuda when available,
    else cpu)."""
    if isinstance(spec, dict):
        return explicit_map(spec, units)
    if spec is None:
        import torch

        default = parse_device(device or ("cuda" if torch.cuda.is_available() else "cpu"), "device")
        if default == "disk":
            raise ConfigError("device: disk cannot compute (use cpu, cuda or cuda:N)")
        return {u: default for u in units}
    text = spec.strip()
    if text.lower() in STRATEGIES:
        return text.lower()
    one: Device | None
    try:
        one = parse_device(text, "--device-map")
    except ConfigError:
        one = None
    if one is not None and one != "disk":
        return {u: one for u in units}
    loaded = _json_object(text, "--device-map", any_file=True)
    if loaded is None:
        raise ConfigError(f"unknown --device-map {spec!r}: use {_FORMS}" + (" (no such file)" if "/" in text else ""))
    return explicit_map(loaded[0], units, loaded[1] or "--device-map")


# ---- strategies -----------------------------------------------------------------------------------


def _order(mem: dict[Device, float]) -> list[Device]:
    gpus = sorted(k for k in mem if isinstance(k, int))
    return gpus + [k for k in ("cpu", "disk") if k in mem]


def _budgets(layer_sizes: dict[str, int], mem: dict[Device, float], strategy: str) -> dict[Device, float]:
    """max_memory capped per GPU for the balanced strategies (accelerate's get_balanced_memory): each
    GPU but the last gets an even share plus the largest unit; balanced_low_0 spreads over GPUs 1..n-1
    and leaves GPU 0 only what they cannot hold (room for generation's outputs); one GPU: as auto."""
    budget = dict(mem)
    gpus = [d for d in _order(mem) if isinstance(d, int) and mem[d] > 0]
    if strategy == "sequential" or len(gpus) < 2:
        return budget
    total, largest = sum(layer_sizes.values()), max(layer_sizes.values(), default=0)
    spread = gpus[1:] if strategy == "balanced_low_0" else gpus
    share = math.ceil(total / len(spread)) + largest
    for g in spread[:-1]:
        budget[g] = min(budget[g], share)
    if strategy == "balanced_low_0":
        budget[gpus[0]] = min(budget[gpus[0]], max(0, total - sum(budget[g] for g in spread)))
    return budget


def _greedy(layer_sizes: dict[str, int], mem: dict[Device, float], strategy: str) -> tuple[dict[str, Device], str | None]:
    """The plan, and the first unit that fit nowhere (None: all placed)."""
    devices = _order(mem)
    largest = max(layer_sizes.values(), default=0)
    budget = _budgets(layer_sizes, mem, strategy)
    plan: dict[str, Device] = {}
    used = {d: 0 for d in devices}
    di = 0
    for unit, size in layer_sizes.items():
        while di < len(devices):
            d = devices[di]
            reserve = largest if di < len(devices) - 1 and d != "disk" else 0
            if used[d] + size <= budget[d] - reserve:
                break
            di += 1
        if di == len(devices):
            return plan, unit
        plan[unit] = devices[di]
        used[devices[di]] += size
    return plan, None


def fmt_mem(mem: dict[Device, float]) -> str:
    """max_memory as --max-memory writes it ("0=20.00GiB,cpu=1000,disk")."""
    def size(v: float) -> str:
        return f"{v / 2**30:.2f}GiB" if v >= 2**30 else f"{v / 2**20:.2f}MiB" if v >= 2**20 else f"{int(v)}"

    return ",".join(f"{d}={size(v)}" if math.isfinite(v) else str(d) for d, v in mem.items())


def plan_device_map(layer_sizes: dict[str, int], max_memory: str | dict | None = None,
                    strategy: str = "auto", warn: Warn | None = None) -> dict[str, Device]:
    """unit -> device. max_memory: accelerate string/dict/JSON; None = defaults (free GPU memory, RAM).

    "auto": balanced over several GPUs, else sequential; "balanced": spread over GPUs evenly;
    "balanced_low_0": spread over GPUs 1..n-1, GPU 0 as empty as possible; "sequential": fill each
    GPU before the next; "cpu": everything on the CPU. What the named devices cannot hold goes to
    disk; unless max_memory names disk, `warn` (default: one line on stderr) says so.
    """
    if strategy not in (*STRATEGIES, "cpu"):
        raise ConfigError(f"unknown device map strategy {strategy!r} ({', '.join(STRATEGIES)}, cpu, experts)")
    mem = parse_max_memory(max_memory) if max_memory is not None else default_max_memory()
    if strategy == "cpu":
        return {u: "cpu" for u in layer_sizes}
    plan, failed = _greedy(layer_sizes, mem, strategy)
    if failed is not None and "disk" not in mem:
        plan, _ = _greedy(layer_sizes, {**mem, "disk": math.inf}, strategy)
        on_disk = [u for u, d in plan.items() if d == "disk"]
        (warn or warning)(f"max_memory {fmt_mem(mem)} cannot hold the model: {len(on_disk)} of {len(plan)} units "
                          f"({on_disk[0]} on) are offloaded to disk and read from the checkpoint's shards on every "
                          f"forward (slow); name disk in --max-memory to plan for it without this warning")
        failed = None
    if failed is not None:
        raise ResourceError(f"{failed} ({layer_sizes[failed]} bytes) does not fit: max_memory {fmt_mem(mem)} is too small")
    return plan


def format_plan(plan: dict[str, Device], layer_sizes: dict[str, int]) -> str:
    """One line per unit (unit -> device, bytes) plus per-device totals."""
    w = max((len(u) for u in plan), default=12)
    lines = [f"{u:<{w}} -> {str(d):<5} {layer_sizes[u]:>14,d} B" for u, d in plan.items()]
    totals: dict[str, int] = {}
    for u, d in plan.items():
        totals[str(d)] = totals.get(str(d), 0) + layer_sizes[u]
    lines.append("total: " + ", ".join(f"{d}={b / 2**20:.1f} MiB" for d, b in totals.items()))
    return "\n".join(lines)
