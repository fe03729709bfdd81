"""MoBE experts: the factored form (bases mixed only for routed experts) equals the original form
run on reconstructed weights W_e = A_e act(sum_i softmax(alpha_e)_i B_g(e),i)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mobe_stream.factorize.model import ACTIVATIONS as ACTS
from mobe_stream.runtime.model import load_model
from mobe_stream.synth import make_tiny_moe

IDS = torch.tensor([[3, 14, 15, 92, 65, 35, 89, 79, 32, 38]])


def _load_all(d: Path) -> dict[str, torch.Tensor]:
    sd = {}
    for f in sorted(d.glob("*.safetensors")):
        sd.update(load_file(str(f)))
    return sd


def _write(d: Path, sd: dict, config: dict) -> Path:
    d.mkdir(parents=True)
    save_file(sd, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    return d


def mobeify(src: Path, out: Path, bases: int = 4, rank: int = 16, groups: int = 2, act: str = "silu",
            seed: int = 0) -> tuple[Path, Path]:
    """(MoBE checkpoint with random factors, original-layout checkpoint holding W_e = A_e M_e)."""
    g = torch.Generator().manual_seed(seed)
    cfg = json.loads((src / "config.json").read_text())
    sd = _load_all(src)
    E = cfg.get("n_routed_experts") or cfg.get("num_experts")
    p, d = cfg["moe_intermediate_size"], cfg["hidden_size"]
    layers = sorted({int(k.split(".")[2]) for k in sd if ".mlp.experts." in k})
    mobe, recon = dict(sd), dict(sd)
    for i in layers:
        pre = f"model.layers.{i}.mlp.experts."
        fused = pre + "gate_up_proj" in sd
        Ws = {}
        for proj in ("gate_proj", "up_proj"):
            A = torch.randn(E, p, rank, generator=g) * 0.2
            B = torch.randn(groups, bases // groups, rank, d, generator=g) * 0.2
            alpha = torch.randn(E, bases // groups, generator=g)
            mobe.update({pre + proj + ".mobe_A": A, pre + proj + ".mobe_B": B, pre + proj + ".mobe_alpha": alpha})
            M = ACTS[act](torch.einsum("em,emrd->erd", alpha.softmax(-1), B[torch.arange(E) // (E // groups)]))
            Ws[proj] = A @ M
            for e in range(E):
                mobe.pop(f"{pre}{e}.{proj}.weight", None)
                recon[f"{pre}{e}.{proj}.weight"] = Ws[proj][e].clone()
        if fused:
            mobe.pop(pre + "gate_up_proj")
            recon[pre + "gate_up_proj"] = torch.cat([Ws["gate_proj"], Ws["up_proj"]], dim=1)
            for e in range(E):
                for proj in ("gate_proj", "up_proj"):
                    recon.pop(f"{pre}{e}.{proj}.weight")
    mcfg = dict(cfg, mobe={"format_version": 1, "method": "mobe", "num_bases": bases, "rank": rank, "groups": groups,
                           "activation": act, "projections": ["gate_proj", "up_proj"], "layers": layers,
                           "layout": "fused" if any(k.endswith("gate_up_proj") for k in sd) else "per_expert",
                           "dtype": "float32", "source_family": cfg["model_type"]})
    for f in ("tokenizer.json", "tokenizer_config.json"):
        if (src / f).exists():
            for dst in (out / "mobe", out / "recon"):
                dst.mkdir(parents=True, exist_ok=True)
                shutil.copy(src / f, dst / f)
    return (_write_ok(out / "mobe", mobe, mcfg), _write_ok(out / "recon", recon, cfg))


def _write_ok(d: Path, sd: dict, config: dict) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps(config))
    return d


def _logits(path: Path, **kw) -> torch.Tensor:
    m = load_model(path, dtype=torch.float32, **kw)
    try:
        full = m(IDS)[0]
        cache = m.new_cache()
        inc = torch.cat([m(IDS[:, :6], cache)[0]] + [m(IDS[:, j:j + 1], cache)[0] for j in range(6, IDS.shape[1])])
        torch.testing.assert_close(inc, full, rtol=1e-4, atol=1e-5)
        return full
    finally:
        m.close()


@pytest.mark.parametrize("family,layout,act", [("qwen3_moe", "per_expert", "silu"), ("deepseek_v3", "fused", "tanh"),
                                               ("kimi_k2", "per_expert", "silu")])
def test_mobe_matches_reconstructed(tmp_path, family, layout, act):
    src = make_tiny_moe(tmp_path / "src", family, layout=layout, dtype=torch.float32, num_shards=1)
    mobe, recon = mobeify(src, tmp_path, act=act)
    ref = _logits(recon)
    got = _logits(mobe)
    assert (got - ref).abs().max() / ref.abs().max() < 1e-4
    cached = _logits(mobe, mobe_cache="1MiB")
    assert (cached - ref).abs().max() / ref.abs().max() < 1e-4
    every = _logits(mobe, materialize_all=True)  # all experts mixed and materialised (the reference's way)
    assert (every - ref).abs().max() / ref.abs().max() < 1e-4


def test_only_routed_experts_are_mixed(tmp_path):
    src = make_tiny_moe(tmp_path / "src", "qwen3_moe", dtype=torch.float32, num_shards=1, num_experts=16)
    mobe, _ = mobeify(src, tmp_path)
    m = load_model(mobe, dtype=torch.float32)
    cache = m.new_cache()
    m(IDS[:, :1], cache)  # one token: top_k experts per MoE layer, two projections
    routed_only = m.mobe_mixed
    assert routed_only == 2 * m.cfg.top_k * len(m.cfg.moe_layers)
    m.close()
    m = load_model(mobe, dtype=torch.float32, materialize_all=True)
    m(IDS[:, :1])
    assert m.mobe_mixed == 2 * 16 * len(m.cfg.moe_layers)
    m.close()


def test_mixed_basis_cache_is_byte_bounded():
    from mobe_stream.runtime.mobe_experts import MixedBasisCache
    c = MixedBasisCache(3 * 4 * 16)  # three fp32 [4, 4] tensors
    for e in range(5):
        c.put((0, e), torch.zeros(4, 4))
    assert c.bytes <= 3 * 64 and c.get((0, 0)) is None and c.get((0, 4)) is not None
