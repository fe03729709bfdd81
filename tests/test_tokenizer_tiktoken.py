"""Kimi-K2's tiktoken vocabulary (tiktoken.model, no tokenizer.json): generate/eval/--chat from the CLI,
Kimi's split pattern, round trips on multilingual text, streaming, and refused malformed files."""

from __future__ import annotations

import base64
import importlib.util
import json
import shutil
from itertools import pairwise

import pytest
import typer
from typer.testing import CliRunner

from mobe_stream.checkpoint.tiktoken_vocab import NUM_RESERVED_SPECIALS, read_ranks
from mobe_stream.cli_runtime import register
from mobe_stream.runtime.tokenizer import StreamDecoder, Tokenizer
from mobe_stream.synth import make_tiny_moe
from tests.helpers import REPO, dir_digest

app = typer.Typer()
register(app)
runner = CliRunner()

TRAP = "import pathlib\npathlib.Path(__file__).with_name('EXECUTED').write_text('tokenization_kimi.py ran')\n"

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "专家混合模型把每个词元送到少数几个专家。",
    "日本語のテキストも少し入れておきます。カタカナ",
    "Модель смеси экспертов: Привет, мир!",
    "نموذج خليط الخبراء يوجه كل رمز",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷",
    "def f(x):\n    return x**2  # 12345678 + 3.14159\n\n\n\tend\r\n",
    "numbers 12345678 1,234,567.89 007",
    "   leading and trailing   \n\n  \t ",
    "mixed中文English混合 THEY'LL we're I'm",
    "",
    "a" * 30_000 + " " * 26_000 + "b",  # runs longer than Kimi's 25k cut
]


@pytest.fixture(scope="module")
def kimi(tmp_path_factory):
    d = make_tiny_moe(tmp_path_factory.mktemp("k") / "kimi", "kimi_k2", tokenizer="tiktoken", num_shards=1)
    (d / "tokenization_kimi.py").write_text(TRAP)  # as on the hub; it must never run
    return d


def _json(res):
    return json.loads([line for line in res.stdout.splitlines() if line.startswith("{")][-1])


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line_error(res, *words):
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == 2 and len(lines) == 1, res.output
    assert all(w in lines[0] for w in words), lines[0]


def test_fixture_has_kimi_layout(kimi):
    assert not (kimi / "tokenizer.json").exists() and (kimi / "tiktoken.model").is_file()
    cfg = json.loads((kimi / "config.json").read_text())
    tc = json.loads((kimi / "tokenizer_config.json").read_text())
    ranks = read_ranks(kimi / "tiktoken.model")
    assert cfg["vocab_size"] == len(ranks) + 256 and len(ranks) > 256 + 200  # bytes + a few hundred merges
    added = {v["content"]: int(k) for k, v in tc["added_tokens_decoder"].items()}
    assert all(len(ranks) <= i < cfg["vocab_size"] for i in added.values())
    assert cfg["bos_token_id"] == added["[BOS]"] and cfg["eos_token_id"] == added["[EOS]"]
    assert "<|im_user|>" in tc["chat_template"]


def test_generate_and_eval_from_cli(kimi, tmp_path):
    res = runner.invoke(app, ["generate", str(kimi), "--prompt", "专家 experts 12345", "--max-new-tokens", "5",
                              "--dtype", "fp32", "--json"])
    assert res.exit_code == 0, res.output
    got = _json(res)
    tok = Tokenizer(kimi)
    assert got["prompt_tokens"] == len(tok.encode("专家 experts 12345")) and got["new_tokens"] > 0
    assert got["text"] == tok.decode(got["token_ids"])
    res = runner.invoke(app, ["generate", str(kimi), "--prompt", "Hello", "--max-new-tokens", "4"])
    assert res.exit_code == 0 and res.stdout.endswith("\n") and "tok/s" in res.stderr
    text = tmp_path / "t.txt"
    text.write_text("专家混合模型 The experts of a layer look alike. Привет 12345678.\n" * 4, encoding="utf-8")
    res = runner.invoke(app, ["eval", str(kimi), "--text", str(text), "--ctx", "32", "--json"])
    assert res.exit_code == 0, res.output
    r = _json(res)
    assert r["tokens"] > 32 and r["windows"] >= 2 and r["perplexity"] > 1
    assert not (kimi / "EXECUTED").exists()


def test_chat_renders_template_with_special_ids(kimi):
    tok = Tokenizer(kimi)
    tc = json.loads((kimi / "tokenizer_config.json").read_text())
    special = {v["content"]: int(k) for k, v in tc["added_tokens_decoder"].items()}
    text = tok.chat_text("Hello 世界")
    ids = tok.encode_chat("Hello 世界")
    for name in ("<|im_system|>", "<|im_user|>", "<|im_middle|>", "<|im_end|>", "<|im_assistant|>"):
        assert special[name] in ids and name in text
    assert ids.count(special["<|im_middle|>"]) == 3 and ids[-1] == special["<|im_middle|>"]
    assert tok.decode(ids, skip_special=False) == text  # round trip with the special tokens kept
    assert tok.decode(ids) == "systemYou are a helpful assistantuserHello 世界assistant"
    assert text.endswith("<|im_user|>user<|im_middle|>Hello 世界<|im_end|><|im_assistant|>assistant<|im_middle|>")
    res = runner.invoke(app, ["generate", str(kimi), "--chat", "--prompt", "Hello 世界", "--max-new-tokens", "3",
                              "--json"])
    assert res.exit_code == 0, res.output
    assert _json(res)["prompt_tokens"] == len(ids)


def test_chat_template_file_wins_and_bad_templates_exit_2(kimi, tmp_path):
    d = _copy(kimi, tmp_path / "k")
    (d / "chat_template.jinja").write_text("{{ bos_token }}{% for m in messages %}<|im_user|>{{ m['content'] }}"
                                           "{% endfor %}{% if add_generation_prompt %}<|im_assistant|>{% endif %}")
    assert Tokenizer(d).chat_text("hi") == "[BOS]<|im_user|>hi<|im_assistant|>"
    for bad in ("{{ raise_exception('no system role') }}", "{{ messages.append(1) }}", "{% for %}"):
        (d / "chat_template.jinja").write_text(bad)
        res = runner.invoke(app, ["generate", str(d), "--chat", "--prompt", "hi"])
        _one_line_error(res, "chat_template.jinja", "chat template")
    (d / "chat_template.jinja").unlink()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    del tc["chat_template"]
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    res = runner.invoke(app, ["generate", str(d), "--chat", "--prompt", "hi"])
    _one_line_error(res, "--chat", "no chat template")
    assert runner.invoke(app, ["generate", str(d), "--prompt", "hi", "--max-new-tokens", "1"]).exit_code == 0


def test_malformed_vocabulary_exits_2_naming_file_and_line(kimi, tmp_path):
    d = _copy(kimi, tmp_path / "k")
    good = (d / "tiktoken.model").read_bytes().splitlines()
    cases = {
        b"no-rank-here": "line 300",
        b"!!!notbase64 299": "line 300: token",
        good[5]: "line 300: token",  # a token repeated
        base64.b64encode(b"fresh token") + b" 5": "line 300: rank 5 repeats line 6",
    }
    for line, words in cases.items():
        (d / "tiktoken.model").write_bytes(b"\n".join(good[:299] + [line] + good[300:]) + b"\n")
        res = runner.invoke(app, ["generate", str(d), "--prompt", "hi"])
        _one_line_error(res, "tiktoken.model", words)
    (d / "tiktoken.model").write_bytes(b"\n".join(good[1:]) + b"\n")  # byte 0x00's token gone
    _one_line_error(runner.invoke(app, ["eval", str(d), "--text", str(d / "config.json")]), "tiktoken.model")
    (d / "tiktoken.model").write_bytes(b"\n".join(good) + b"\n")
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["added_tokens_decoder"]["7"] = {"content": "<|clash|>"}  # inside the base vocabulary
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    _one_line_error(runner.invoke(app, ["generate", str(d), "--prompt", "hi"]), "tokenizer_config.json", "<|clash|>")


@pytest.mark.parametrize("text", TEXTS, ids=range(len(TEXTS)))
def test_round_trip_multilingual(kimi, text):
    tok = Tokenizer(kimi)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    if len(ids) > 2000:
        return  # StreamDecoder re-decodes the whole list per token: fine for generation, slow for 50k tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) == text and not any("\ufffd" in p for p in pieces)  # only whole characters streamed


def test_special_names_and_reserved_block(kimi):
    tok = Tokenizer(kimi)
    n = len(read_ranks(kimi / "tiktoken.model"))
    assert tok.encode("<|im_end|>") == [tok.token_id("<|im_end|>")] and tok.token_id("<|im_end|>") >= n
    assert tok.token_id(f"<|reserved_token_{n + 5}|>") == n + 5  # unlisted ids of Kimi's block
    assert tok.token_id(f"<|reserved_token_{n + NUM_RESERVED_SPECIALS}|>") is None
    assert tok.decode([tok.token_id("[BOS]"), *tok.encode("ok"), 10**6]) == "ok"  # specials, unknown ids dropped


SPLITS = {
    "12345678": ["123", "456", "78"],
    "中文English混合": ["中文", "English", "混合"],
    "日本語のテキスト": ["日本語", "のテキスト"],
    "Hello world's  end\n\nnext": ["Hello", " world's", " ", " end", "\n\n", "next"],
    "THEY'LL go, 2024!": ["THEY'LL", " go", ",", " ", "202", "4", "!"],
    "x**2 Привет": ["x", "**", "2", " Привет"],
    "a\r\n  b": ["a", "\r\n", " ", " b"],
}


def test_pre_tokenizer_splits_like_kimi(tmp_path):
    """The vocabulary holds every prefix of each expected piece and of each two adjacent pieces joined.
    BPE then ends each pre-tokenizer piece as one token (t1 + t2 is always a prefix in the vocabulary),
    so a piece split too finely or joined across an expected boundary decodes differently."""
    tokens = [bytes([b]) for b in range(256)]
    for pieces in SPLITS.values():
        for p in pieces + [a + b for a, b in pairwise(pieces)]:
            b = p.encode()
            tokens += [b[:k] for k in range(2, len(b) + 1) if b[:k] not in tokens]
    d = tmp_path / "v"
    d.mkdir()
    (d / "tiktoken.model").write_text("".join(f"{base64.b64encode(t).decode()} {i}\n" for i, t in enumerate(tokens)))
    tok = Tokenizer(d)
    assert tok.backend == "tiktoken"
    for text, want in SPLITS.items():
        assert [tok.decode([i]) for i in tok.encode(text)] == want, text


def test_backend_by_files_present(kimi, tmp_path):
    from mobe_stream.synth.tokenizer import write_tokenizer

    d = _copy(kimi, tmp_path / "both")
    write_tokenizer(d, 512)
    assert Tokenizer(d).backend == "tokenizers"
    for f in ("tokenizer.json", "tiktoken.model"):
        (d / f).unlink()
    _one_line_error(runner.invoke(app, ["generate", str(d), "--prompt", "hi"]), "no tokenizer found")


def test_factory_deterministic_and_cli(tmp_path):
    a = make_tiny_moe(tmp_path / "a", "kimi_k2", tokenizer="tiktoken", num_layers=2, num_shards=1)
    spec = importlib.util.spec_from_file_location("make_tiny_moe_tool", REPO / "tools" / "make_tiny_moe.py")
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    assert tool.main([str(tmp_path / "b"), "--family", "kimi_k2", "--tokenizer", "tiktoken", "--num-layers", "2",
                      "--num-shards", "1"]) == 0
    assert dir_digest(a) == dir_digest(tmp_path / "b")
    big = make_tiny_moe(tmp_path / "c", "kimi_k2", tokenizer="tiktoken", num_layers=2, vocab_size=1100)
    assert len(read_ranks(big / "tiktoken.model")) == 1100 - 256
    for vocab in (300, 10_000):
        with pytest.raises(ValueError, match="vocab_size"):
            make_tiny_moe(tmp_path / "d", "kimi_k2", tokenizer="tiktoken", vocab_size=vocab)
