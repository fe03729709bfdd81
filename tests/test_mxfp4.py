"""MXFP4 (gpt-oss `_blocks`/`_scales`): exact dequantization, the reader's dense view, bad pairs refused."""

from __future__ import annotations

import pytest
import torch

from mobe_stream.checkpoint import mxfp4
from mobe_stream.checkpoint.families import get_family
from mobe_stream.checkpoint.reader import CheckpointReader
from mobe_stream.errors import CheckpointError

E, D, P2 = 3, 64, 32  # experts, input dim (2 blocks), output dim


def _packed(seed=0):
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(0, 16, (E, P2, D // 32, 32), generator=g)
    blocks = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    scales = torch.randint(118, 130, (E, P2, D // 32), generator=g, dtype=torch.uint8)
    lut = torch.tensor(mxfp4.FP4_VALUES)
    dense = (lut[codes] * torch.exp2(scales.float() - 127)[..., None]).reshape(E, P2, D).mT  # [E, in, out]
    return blocks, scales, dense


def test_dequantize_is_exact_and_quantize_inverts_it():
    blocks, scales, dense = _packed()
    got = mxfp4.dequantize(blocks, scales)
    assert got.dtype == torch.bfloat16 and got.shape == (E, D, P2) == mxfp4.dense_shape(tuple(blocks.shape))
    assert torch.equal(got.float(), dense)  # every MXFP4 value is exact in bf16
    assert torch.equal(mxfp4.dequantize(blocks[1], scales[1], torch.float32), dense[1])  # one expert's slice
    b2, s2 = mxfp4.quantize(dense)
    assert torch.equal(mxfp4.dequantize(b2, s2).float(), dense)


def _cfg() -> dict:
    return {"model_type": "gpt_oss", "hidden_size": D, "intermediate_size": P2 // 2, "num_hidden_layers": 1,
            "num_local_experts": E, "num_experts_per_tok": 2, "quantization_config": {"quant_method": "mxfp4"}}


def test_reader_presents_the_dense_tensor(make_ckpt):
    blocks, scales, dense = _packed(1)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    d = make_ckpt({name + "_blocks": blocks, name + "_scales": scales, "model.norm.weight": torch.ones(D)}, _cfg(),
                  shards=2)
    with CheckpointReader(d) as r:
        assert name in r and name + "_blocks" not in r and name + "_scales" not in r and r.is_derived(name)
        assert r.info(name).dtype == "BF16" and r.info(name).shape == (E, D, P2)
        assert torch.equal(r.get(name).float(), dense) and torch.equal(r.get(name, torch.float32), dense)
        assert torch.equal(r.get_expert(name, 2, torch.float32), dense[2])
        fam = get_family(r.config, r)
        assert fam.layout == "fused"
        gate, up = dense[1].mT[0::2], dense[1].mT[1::2]  # gpt-oss: gate/up columns interleaved
        assert torch.equal(fam.expert_weight(r, 0, 1, "gate_proj"), gate)
        assert torch.equal(fam.expert_weight(r, 0, 1, "up_proj"), up)


def test_malformed_pair_refused(make_ckpt):
    blocks, scales, _ = _packed(2)
    name = "model.layers.0.mlp.experts.down_proj"
    d = make_ckpt({name + "_blocks": blocks, name + "_scales": scales[:, :, :1]}, _cfg())
    with pytest.raises(CheckpointError, match=r"MXFP4 tensor .*down_proj: scales of shape \[3, 32, 1\] do not match"):
        CheckpointReader(d)
