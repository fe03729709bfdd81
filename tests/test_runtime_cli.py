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
    # cpu=1KB used to be "does not fit" (exit 2); as accelerate does, what does not fit now goes to disk
    # with one warning (test_disk_fallback_warns_once_on_stderr)
    res = runner.invoke(app, ["generate", str(tiny), "--prompt", "hi", "--max-memory", "cpu=1KB,disk=1KB"])
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


def _set_config(path, **changes):
    cfg_path = path / "config.json"
    cfg = json.loads(cfg_path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    cfg_path.write_text(json.dumps(cfg))


def test_dtype_auto_is_the_checkpoints_own(tiny, tmp_path):
    """--dtype defaults to auto: config.json's dtype (torch_dtype before transformers 5); FP8 checkpoints
    compute in bfloat16; no dtype in the config: bfloat16. The JSON output says which was used."""
    f32 = make_tiny_moe(tmp_path / "f32", "qwen3_moe", dtype=torch.float32, num_shards=1)
    fp8 = make_tiny_moe(tmp_path / "fp8", "deepseek_v3", fp8=True, num_shards=1)
    text = tmp_path / "t.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 4)

    def used(path, *args, cmd="generate"):
        extra = ["--prompt", "hi", "--max-new-tokens", "1"] if cmd == "generate" else ["--text", str(text), "--ctx", "8"]
        res = runner.invoke(app, [cmd, str(path), *extra, "--json", *args])
        assert res.exit_code == 0, res.output
        return _json(res)["dtype"]

    assert used(f32) == used(f32, cmd="eval") == "float32"  # was bfloat16 whatever the checkpoint
    assert used(tiny) == "bfloat16" and used(fp8) == "bfloat16"
    _set_config(f32, torch_dtype=None, dtype="float16")  # transformers 5 spelling
    assert used(f32) == "float16"
    _set_config(f32, dtype=None)
    assert used(f32) == "bfloat16"
    # every spelling of transformers/torch, on both commands
    for spelling, want in (("half", "float16"), ("float", "float32"), ("BF16", "bfloat16"), ("fp32", "float32")):
        assert used(tiny, "--dtype", spelling) == want and used(tiny, "--dtype", spelling, cmd="eval") == want
    res = runner.invoke(app, ["generate", str(tiny), "--prompt", "hi", "--dtype", "int4"])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1
    assert "auto, bf16, bfloat16, fp16, float16, half, fp32, float32, float" in res.stderr
    _set_config(f32, dtype="float64")
    res = runner.invoke(app, ["generate", str(f32), "--prompt", "hi"])
    assert res.exit_code == 2 and "config.json" in res.stderr and "float64" in res.stderr


def test_compress_and_export_accept_the_same_dtype_spellings():
    """One spelling table (mobe_stream/dtypes.py) for every command: compress and export take half/float too."""
    from mobe_stream.dtypes import spellings
    from mobe_stream.errors import ConfigError
    from mobe_stream.pipeline.export import ExportOptions, _target_dtype
    from mobe_stream.pipeline.options import CompressOptions, resolve_dtype

    cfg = {"mobe": {"dtype": "bfloat16"}, "quantization_config": {"quant_method": "fp8"}}
    for s in spellings(fp8=True):
        CompressOptions(dtype=s).validate()
        assert _target_dtype(cfg, ExportOptions(dtype=s)) in ("bf16", "fp16", "fp32", "fp8")
    assert resolve_dtype("half", {"BF16"}) == torch.float16 and resolve_dtype("float", {"BF16"}) == torch.float32
    assert _target_dtype(cfg, ExportOptions(dtype="float")) == "fp32"
    assert _target_dtype(cfg, ExportOptions(dtype="bfloat16")) == "bf16"  # was refused: short names only
    with pytest.raises(ConfigError, match="half"):
        CompressOptions(dtype="int4").validate()


def test_disk_fallback_warns_once_on_stderr(tiny):
    """A max_memory without disk that cannot hold the model: the rest goes to disk with one warning line
    (accelerate's behaviour), the tokens are the in-memory ones."""
    args = ["generate", str(tiny), "--prompt", "The quick brown fox", "--max-new-tokens", "4"]
    ref = runner.invoke(app, args)
    res = runner.invoke(app, [*args, "--max-memory", "cpu=1KB", "--print-device-map"])
    assert res.exit_code == 0, res.output
    warnings = [line for line in res.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "offloaded to disk" in warnings[0] and "cpu=1000" in warnings[0]
    assert res.stdout == ref.stdout and "-> disk" in res.stderr
    named = runner.invoke(app, [*args, "--max-memory", "cpu=1KB,disk"])
    assert named.exit_code == 0 and "warning:" not in named.stderr


def test_device_map_and_max_memory_as_json(tiny, tmp_path):
    args = ["generate", str(tiny), "--prompt", "The quick brown fox", "--max-new-tokens", "4"]
    ref = runner.invoke(app, args)
    spec = tmp_path / "map.json"
    spec.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "disk", "model.layers.0": "cpu",
                                "model.norm": "cpu", "lm_head": "cpu"}))
    res = runner.invoke(app, [*args, "--device-map", str(spec), "--json"])
    assert res.exit_code == 0, res.output
    d = _json(res)
    assert d["device_map"] == {"embed": "cpu", "layers.0": "cpu", "layers.1": "disk", "layers.2": "disk",
                               "norm": "cpu", "lm_head": "cpu"}
    assert d["text"] == ref.stdout.rstrip("\n")
    spec.write_text(json.dumps({"model.embed_tokens": "cpu", "model.layers": "cpu"}))
    for cmd in (args, ["eval", str(tiny), "--text", str(spec)]):
        res = runner.invoke(app, [*cmd, "--device-map", str(spec)])
        assert res.exit_code == 2 and f"{spec}: device map does not place norm" in res.stderr
        assert len(res.stderr.strip().splitlines()) == 1
    mem = tmp_path / "mem.json"
    mem.write_text('{"cpu": 1000, "disk": null}')
    for spec_mem in (str(mem), '{"cpu": "1000", "disk": null}'):
        res = runner.invoke(app, [*args, "--max-memory", spec_mem, "--dry-run"])
        assert res.exit_code == 0 and "-> disk" in res.stdout and "warning" not in res.stderr, res.output
    mem.write_text('{"cpu": "lots"}')
    res = runner.invoke(app, [*args, "--max-memory", str(mem)])
    assert res.exit_code == 2 and res.stderr.startswith(f"error: {mem}: max_memory[cpu]: cannot parse size 'lots'")


def test_offload_folder_is_reused_and_says_why_it_is_rewritten(tiny, tmp_path):
    folder = tmp_path / "off"
    args = ["generate", str(tiny), "--prompt", "The quick brown fox", "--max-new-tokens", "3", "--max-memory",
            "cpu=1,disk", "--offload-folder", str(folder)]
    ref = runner.invoke(app, ["generate", str(tiny), "--prompt", "The quick brown fox", "--max-new-tokens", "3",
                              "--dtype", "fp32"])
    first = runner.invoke(app, [*args, "--dtype", "fp32"])
    assert first.exit_code == 0 and first.stdout == ref.stdout, first.output
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    assert "index.json" in stamps and len(stamps) > 1
    again = runner.invoke(app, [*args, "--dtype", "float"])
    assert again.exit_code == 0 and "warning" not in again.stderr and again.stdout == ref.stdout
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps
    half = runner.invoke(app, [*args, "--dtype", "half"])
    assert half.exit_code == 0
    assert [line for line in half.stderr.splitlines() if line.startswith("warning:")] == [
        f"warning: {folder}: offload files were written for dtype float32, not float16; rewriting them"]
    inside = runner.invoke(app, [*args[:-1], str(tiny / "off")])
    assert inside.exit_code == 2 and "must not be or lie inside the model directory" in inside.stderr
    assert not (tiny / "off").exists()
