"""FP8 block dequantization checked against the element-wise definition, incl. edge blocks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mobe_stream.checkpoint import fp8
from mobe_stream.checkpoint.reader import CheckpointReader


def _reference(q: torch.Tensor, s: torch.Tensor, block: tuple[int, int], dtype: torch.dtype) -> torch.Tensor:
    """y[i, j] = float32(q[i, j]) * s[i // bm, j // bn], one element at a time, rounded once."""
    qf = q.to(torch.float32).numpy()
    sf = s.to(torch.float32).numpy()
    bm, bn = block
    out = np.empty(qf.shape, dtype=np.float32)
    for i in range(qf.shape[0]):
        for j in range(qf.shape[1]):
            out[i, j] = np.float32(qf[i, j]) * np.float32(sf[i // bm, j // bn])
    return torch.from_numpy(out).to(dtype)


def _fp8_weight(shape, block, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(shape, generator=g) * 100).clamp(-448, 448).to(fp8.FP8_DTYPE)
    s = torch.rand(fp8.scale_shape(shape, block), generator=g) * 1e-2 + 1e-4
    return q, s


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("shape,block", [((300, 200), (128, 128)), ((130, 70), (64, 32)), ((128, 256), (128, 128))])
def test_dequantize_matches_elementwise(shape, block, dtype):
    q, s = _fp8_weight(shape, block)
    got = fp8.dequantize(q, s, block, dtype)
    want = _reference(q, s, block, dtype)
    assert got.dtype == dtype and torch.equal(got, want)


def test_reader_dequantizes_with_config_block(make_ckpt):
    block = (64, 32)
    q, s = _fp8_weight((130, 70), block, seed=3)
    cfg = {"model_type": "deepseek_v3", "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                                                "weight_block_size": list(block)}}
    d = make_ckpt({"l.weight": q, "l.weight_scale_inv": s}, cfg)
    with CheckpointReader(d) as r:
        assert r.fp8_block == block
        for dtype in (torch.bfloat16, torch.float32):
            assert torch.equal(r.get("l.weight", dtype), _reference(q, s, block, dtype))
        raw = r.get("l.weight")
        assert raw.dtype == fp8.FP8_DTYPE and torch.equal(raw.view(torch.uint8), q.view(torch.uint8))


def test_reader_default_block_when_config_has_none(make_ckpt):
    q, s = _fp8_weight((300, 200), (128, 128), seed=4)
    d = make_ckpt({"l.weight": q, "l.weight_scale_inv": s}, {"model_type": "deepseek_v3"})
    with CheckpointReader(d) as r:
        assert r.fp8_block is None
        assert torch.equal(r.get("l.weight", torch.bfloat16), _reference(q, s, (128, 128), torch.bfloat16))


def test_single_rounding_not_double():
    """Rounding the scale to bf16 first would differ from the fp32 formula somewhere."""
    q, s = _fp8_weight((256, 256), (128, 128), seed=5)
    good = fp8.dequantize(q, s, (128, 128), torch.bfloat16)
    double = _reference(q, s.to(torch.bfloat16).float(), (128, 128), torch.bfloat16)
    assert torch.equal(good, _reference(q, s, (128, 128), torch.bfloat16))
    assert not torch.equal(good, double)


def test_quantize_roundtrip_close():
    g = torch.Generator().manual_seed(6)
    w = torch.randn(300, 200, generator=g) * 0.02
    q, s = fp8.quantize(w)
    assert q.dtype == fp8.FP8_DTYPE and s.shape == (3, 2)
    back = fp8.dequantize(q, s, out_dtype=torch.float32)
    assert ((back - w).norm() / w.norm()).item() < 0.05
