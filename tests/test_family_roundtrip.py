"""Every family end to end on the tiny factory's checkpoints: inspect, compress (MoBE and a
baseline), verify, export back to the family's hub names (transformers loads it with no missing or
unexpected keys and computes what our runner computes on the compact form), generate and eval."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from mobe_stream.checkpoint.reader import CheckpointReader  # noqa: E402
from mobe_stream.model_info import describe  # noqa: E402
from mobe_stream.pipeline.compress import compress  # noqa: E402
from mobe_stream.pipeline.export import ExportOptions, export  # noqa: E402
from mobe_stream.pipeline.options import CompressOptions  # noqa: E402
from mobe_stream.runtime import Tokenizer, generate, load_model, perplexity  # noqa: E402
from mobe_stream.synth import make_tiny_moe  # noqa: E402
from mobe_stream.verify import verify  # noqa: E402

from .helpers import hf_text_logits  # noqa: E402

FAMILIES = ["mixtral", "qwen2_moe", "olmoe", "deepseek_v2", "glm4_moe", "ernie4_5_moe", "minimax_m2", "gpt_oss", "llama4"]
IDS = [5, 17, 3, 99, 42, 7, 61, 8]


CASES = [(f, m) for f in FAMILIES for m in ("mobe", "svd")]
# the other methods on the hub fused forms (gpt-oss: interleaved, with biases; Llama-4: halves)
CASES += [(f, m) for f in ("gpt_oss", "llama4") for m in ("molae", "delta")]


@pytest.mark.parametrize("family,method", CASES)
def test_family_compress_export_roundtrip(tmp_path, family, method):
    src = make_tiny_moe(tmp_path / "src", family, dtype=torch.float32, num_shards=2)
    info = describe(src)
    assert info["family"] == family and info["moe_layers"] and info["expert_params"] > 0
    mobe = tmp_path / "mobe"
    compress(src, mobe, CompressOptions(method=method, num_bases=4, rank=16, steps=5, checkpoint_every=1e9,
                                        dtype="fp32"))
    assert verify(mobe) == []
    out = tmp_path / "exported"
    export(mobe, out, ExportOptions())
    assert verify(out) == []
    with CheckpointReader(src) as a, CheckpointReader(out) as b:  # the family's own names, shapes and dtypes
        assert sorted(a.names()) == sorted(b.names())
        assert all(a.info(n).shape == b.info(n).shape and a.info(n).dtype == b.info(n).dtype for n in a.names())
    model, loaded = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not loaded["missing_keys"] and not loaded["unexpected_keys"], loaded
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    ours = load_model(mobe, dtype=torch.float32)
    try:
        got = ours(torch.tensor([IDS]))[0]
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
        tok = Tokenizer(mobe)
        res = generate(ours, tok, "hello world", max_new_tokens=3, stream=None)
        assert res.new_tokens == 3 or res.stop_reason == "eos"
        ppl = perplexity(ours, tok, "the quick brown fox jumps over the lazy dog " * 4, ctx=16)
        assert ppl["perplexity"] > 1
    finally:
        ours.close()


def test_gpt_oss_mxfp4_source_compress_export(tmp_path):
    """An MXFP4 gpt-oss source: compressed from its dequantized experts; the compact output and the
    export are dense (bf16 `gate_up_proj`/`down_proj`, biases exactly as stored) and claim no MXFP4."""
    src = make_tiny_moe(tmp_path / "src", "gpt_oss", mxfp4=True, dtype=torch.bfloat16, num_shards=2)
    info = describe(src)
    assert info["family"] == "gpt_oss" and info["moe_layers"] == [0, 1, 2] and info["expert_params"] > 0
    assert verify(src) == []
    model = load_model(src, dtype=torch.float32)
    try:
        tok = Tokenizer(src)
        assert generate(model, tok, "hello world", max_new_tokens=3, stream=None).new_tokens in (1, 2, 3)
        assert perplexity(model, tok, "the quick brown fox jumps over the lazy dog " * 4, ctx=16)["perplexity"] > 1
    finally:
        model.close()
    mobe = tmp_path / "mobe"
    compress(src, mobe, CompressOptions(method="mobe", num_bases=4, rank=16, steps=5, checkpoint_every=1e9))
    assert verify(mobe) == []
    out = tmp_path / "exported"
    export(mobe, out, ExportOptions())
    assert verify(out) == []
    with CheckpointReader(src) as a, CheckpointReader(out) as b, CheckpointReader(mobe) as m:
        assert "quantization_config" not in b.config and "quantization_config" not in m.config
        assert sorted(a.names()) == sorted(b.names()) and not any(n.endswith(("_blocks", "_scales")) for n in b.names())
        for n in a.names():
            assert (a.info(n).shape, a.info(n).dtype) == (b.info(n).shape, b.info(n).dtype), n
            if n.endswith(("_bias", "down_proj")):
                assert torch.equal(a.get(n), b.get(n)), n  # biases and down_proj kept exactly
    model, loaded = transformers.AutoModelForCausalLM.from_pretrained(out, output_loading_info=True, dtype=torch.float32)
    assert not loaded["missing_keys"] and not loaded["unexpected_keys"], loaded
    with torch.no_grad():
        ref = model(torch.tensor([IDS])).logits[0]
    ours = load_model(out, dtype=torch.float32)  # the same bf16 weights (the compact form mixes its bases in fp32)
    try:
        got = ours(torch.tensor([IDS]))[0]
        assert ((got - ref).abs().max() / ref.abs().max()).item() < 1e-4
    finally:
        ours.close()


def test_llama4_multimodal_compress_export(tmp_path):
    """Llama-4 as released: only the text model's experts are compressed, the vision tower and the
    projector are kept byte for byte, and the export is the released layout again (transformers'
    Llama4ForConditionalGeneration loads it with no missing or unexpected keys, text logits as ours)."""
    src = make_tiny_moe(tmp_path / "src", "llama4", multimodal=True, dtype=torch.float32, num_shards=2)
    info = describe(src)
    assert info["family"] == "llama4" and info["moe_layers"] == [1]
    mobe = tmp_path / "mobe"
    compress(src, mobe, CompressOptions(method="mobe", num_bases=4, rank=16, steps=5, checkpoint_every=1e9, dtype="fp32"))
    assert verify(mobe) == []
    out = tmp_path / "exported"
    export(mobe, out, ExportOptions())
    assert verify(out) == []
    with CheckpointReader(src) as a, CheckpointReader(out) as b, CheckpointReader(mobe) as m:
        assert sorted(a.names()) == sorted(b.names())
        assert any(n.startswith("language_model.model.layers.1.feed_forward.experts.gate_proj.mobe_") for n in m.names())
        kept = [n for n in a.names() if not n.startswith("language_model.")]
        assert kept and all(torch.equal(a.get(n), m.get(n)) and torch.equal(a.get(n), b.get(n)) for n in kept)
    model, loaded = transformers.Llama4ForConditionalGeneration.from_pretrained(out, output_loading_info=True,
                                                                                 dtype=torch.float32)
    assert not loaded["missing_keys"] and not loaded["unexpected_keys"], loaded
    with torch.no_grad():
        ref = hf_text_logits(model.eval(), torch.tensor([IDS]))[0]
    ours = load_model(mobe, dtype=torch.float32)
    try:
        assert ((ours(torch.tensor([IDS]))[0] - ref).abs().max() / ref.abs().max()).item() < 1e-4
        tok = Tokenizer(mobe)
        assert generate(ours, tok, "hello world", max_new_tokens=3, stream=None).new_tokens in (1, 2, 3)
        assert perplexity(ours, tok, "the quick brown fox jumps over the lazy dog " * 4, ctx=16)["perplexity"] > 1
    finally:
        ours.close()
