"""generate / eval commands through a throwaway Typer app, plus sampling and tokenizer edge cases."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import typer
from typer.testing import CliRunner

from mobe_stream.cli_runtime import register
from mobe_stream.runtime.generate import generate, sample_next
from mobe_stream.runtime.model import load_model
from mobe_stream.runtime.tokenizer import Tokenizer
from mobe_stream.synth import make_tiny_moe

app = typer.Typer()
register(app)
runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_moe(tmp_path_factory.mktemp("m") / "qwen", "qwen3_moe", num_shards=2)


def _json(res):
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def test_generate_greedy_matches_manual_loop(tiny):
    res = runner.invoke(app, ["generate", str(tiny), "--prompt", "The quick brown fox", "--max-new-tokens", "6",
                              "--dtype", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    got = _json(res)
    m = load_model(tiny, dtype=torch.float32)
    tok = Tokenizer(tiny)
    ids = tok.encode("The quick brown fox")
    want = []
    for _ in range(6):  # full forward each step: also checks the KV-cache path used by generate
        nxt = int(m(torch.tensor([ids + want]))[0, -1].argmax())
        if nxt in tok.eos_ids:
            break
        want.append(nxt)
    assert got["token_ids"] == want and got["new_tokens"] == len(want)
    assert got["peak_rss_bytes"] > 0 and "tok/s" in res.stderr


def test_generate_streams_text_and_sampling_is_seeded(tiny):
    args = ["generate", str(tiny), "--prompt", "Experts", "--max-new-tokens", "5", "--temperature", "0.9",
            "--top-k", "50", "--top-p", "0.95", "--seed", "7"]
    a, b = runner.invoke(app, args), runner.invoke(app, args)
    assert a.exit_code == 0 and a.stdout == b.stdout and a.stdout.endswith("\n")
    res = runner.invoke(app, args + ["--print-device-map", "--device-map", "auto", "--max-memory", "cpu=1,disk"])
    assert res.exit_code == 0 and "layers.0" in res.stderr and "disk" in res.stderr
    assert res.stdout == a.stdout  # disk offload: same tokens


def test_sample_next_filters():
    logits = torch.tensor([0.0, 5.0, 4.0, -1.0])
    assert sample_next(logits) == 1
    g = torch.Generator().manual_seed(0)
    assert {sample_next(logits, 1.0, top_k=1, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g) for _ in range(20)} == {1}
    assert {sample_next(logits, 5.0, top_k=2, generator=g) for _ in range(50)} == {1, 2}


def test_stops_at_eos(tiny):
    m = load_model(tiny, dtype=torch.float32)
    tok = Tokenizer(tiny)
    first = int(m(torch.tensor([tok.encode("The lazy dog")]))[0, -1].argmax())
    tok.eos_ids = {first}
    r = generate(m, tok, "The lazy dog", max_new_tokens=10, stream=None)
    assert r.stop_reason == "eos" and r.new_tokens == 0


def test_errors_exit_2(tiny, tmp_path):
    kimi = tmp_path / "kimi"
    shutil.copytree(tiny, kimi)
    (kimi / "tokenizer.json").unlink()
    (kimi / "tiktoken.model").write_text("x")
    res = runner.invoke(app, ["generate", str(kimi), "--prompt", "hi"])
    assert res.exit_code == 2 and "tiktoken" in res.stderr and len(res.stderr.strip().splitlines()) == 1
    res = runner.invoke(app, ["generate", str(tmp_path / "nope"), "--prompt", "hi"])
    assert res.exit_code == 2 and "does not exist" in res.stderr
    res = runner.invoke(app, ["generate", str(tiny), "--prompt", "hi", "--max-memory", "cpu=12 parsecs"])
    assert res.exit_code == 2
    res = runner.invoke(app, ["generate", str(tiny), "--prompt", "hi", "--max-memory", "cpu=1KB"])
    assert res.exit_code == 2 and "does not fit" in res.stderr


def test_eval_original_and_mobe(tiny, tmp_path):
    from tests.test_runtime_mobe import mobeify

    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. Experts of a layer look alike. " * 8)
    src = make_tiny_moe(tmp_path / "f32", "deepseek_v3", dtype=torch.float32, num_shards=1)
    mobe, recon = mobeify(src, tmp_path / "mb")
    ppl = {}
    for name, path in (("orig", src), ("mobe", mobe), ("recon", recon)):
        res = runner.invoke(app, ["eval", str(path), "--text", str(text), "--ctx", "32", "--dtype", "fp32", "--json"])
        assert res.exit_code == 0, res.output
        ppl[name] = _json(res)
        assert ppl[name]["windows"] >= 2 and ppl[name]["perplexity"] > 1
    assert abs(ppl["mobe"]["perplexity"] - ppl["recon"]["perplexity"]) < 1e-3 * ppl["recon"]["perplexity"]
    res = runner.invoke(app, ["eval", str(src), "--text", str(text), "--ctx", "1"])
    assert res.exit_code == 2
