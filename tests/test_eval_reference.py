"""eval --reference: KL(P_ref || P_model) per token, top-1 agreement and the reference's perplexity
over the same windows, against an independent computation; references that cannot be compared."""

from __future__ import annotations

import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import typer
from typer.testing import CliRunner

from mobe_stream.cli_runtime import register
from mobe_stream.runtime.model import load_model
from mobe_stream.runtime.tokenizer import Tokenizer
from mobe_stream.synth import make_tiny_moe
from mobe_stream.synth.tokenizer import write_tokenizer
from tests.test_runtime_cli import _json
from tests.test_runtime_mobe import mobeify

app = typer.Typer()
register(app)
runner = CliRunner()
CTX = 32
KEYS = {"reference", "reference_perplexity", "kl", "top1_agreement"}


@pytest.fixture(scope="module")
def text(tmp_path_factory):
    t = tmp_path_factory.mktemp("t") / "t.txt"
    t.write_text("The quick brown fox jumps over the lazy dog. Experts of a layer look alike. " * 8)
    return t


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("m") / "qwen", "qwen3_moe", dtype=torch.float32, num_shards=2)


def _eval(model, text, *extra):
    res = runner.invoke(app, ["eval", str(model), "--text", str(text), "--ctx", str(CTX), "--dtype", "fp32", *extra])
    assert res.exit_code == 0, res.output
    return res


def test_model_against_itself(tiny, text):
    got = _json(_eval(tiny, text, "--reference", str(tiny), "--json"))
    assert abs(got["kl"]) < 1e-6 and got["top1_agreement"] == 1.0
    assert got["perplexity"] == got["reference_perplexity"] > 1
    assert got["reference"] == str(tiny) and got["windows"] >= 2


def test_mobe_against_source(tmp_path, text):
    src = make_tiny_moe(tmp_path / "f32", "deepseek_v3", dtype=torch.float32, num_shards=1)
    mobe, _ = mobeify(src, tmp_path / "mb")
    got = _json(_eval(mobe, text, "--reference", str(src), "--json"))
    assert 0 < got["kl"] < math.inf and 0 <= got["top1_agreement"] <= 1
    # The same windows as eval without --reference, for either model.
    assert got["perplexity"] == pytest.approx(_json(_eval(mobe, text, "--json"))["perplexity"], rel=1e-6)
    assert got["reference_perplexity"] == pytest.approx(_json(_eval(src, text, "--json"))["perplexity"], rel=1e-6)

    m, ref = load_model(mobe, dtype=torch.float32), load_model(src, dtype=torch.float32)
    ids = Tokenizer(src).encode(text.read_text())
    kl, agree, n = 0.0, 0, 0
    for s in range(0, len(ids) - 1, CTX):
        w = torch.tensor([ids[s:s + CTX]])
        out, want = m(w)[0, :-1], ref(w)[0, :-1]  # fp32 logits; probabilities (not log) as the target
        kl += F.kl_div(out.log_softmax(-1), want.softmax(-1), reduction="sum").item()
        agree += int((out.argmax(-1) == want.argmax(-1)).sum())
        n += w.shape[1] - 1
    m.close()
    ref.close()
    assert got["tokens"] == n
    assert got["kl"] == pytest.approx(kl / n, rel=1e-5)
    assert got["top1_agreement"] == agree / n


def test_other_tokenizer_or_vocabulary_refused(tiny, text, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(tiny, other)
    write_tokenizer(other, 300)
    assert Tokenizer(other).encode(text.read_text()) != Tokenizer(tiny).encode(text.read_text())
    res = runner.invoke(app, ["eval", str(tiny), "--text", str(text), "--reference", str(other)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "tokenize the text differently" in res.stderr and str(tiny) in res.stderr and str(other) in res.stderr

    wide = make_tiny_moe(tmp_path / "wide", "qwen3_moe", vocab_size=640, num_shards=1)  # the same tokenizer.json
    res = runner.invoke(app, ["eval", str(tiny), "--text", str(text), "--reference", str(wide)])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "vocabulary" in res.stderr and str(tiny) in res.stderr and str(wide) in res.stderr

    res = runner.invoke(app, ["eval", str(tiny), "--text", str(text), "--reference-revision", "main"])
    assert res.exit_code == 2 and "only used with --reference" in res.stderr


def test_reference_keys_and_line_only_with_reference(tiny, text):
    alone = _json(_eval(tiny, text, "--json"))
    assert not KEYS & alone.keys() and alone["perplexity"] > 1
    both = _json(_eval(tiny, text, "--json", "--reference", str(tiny)))
    assert KEYS <= both.keys() and both.keys() - KEYS == alone.keys()
    plain, compared = _eval(tiny, text).stdout.splitlines(), _eval(tiny, text, "--reference", str(tiny)).stdout.splitlines()
    assert len(compared) == len(plain) + 1 and compared[:-1][0].startswith("perplexity")
    assert "KL(reference || model) 0.000000" in compared[-1] and "top-1 agreement 1.0000" in compared[-1]
