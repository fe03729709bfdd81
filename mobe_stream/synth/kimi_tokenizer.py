"""A tiny tiktoken vocabulary in Kimi-K2's layout: tiktoken.model (all 256 bytes + byte-pair merges
learned on a small built-in multilingual text), and a tokenizer_config.json with Kimi-like special
tokens and a Kimi-like chat template. No tokenizer.json, as on the hub.

The merges are learned here (a plain deterministic BPE over Kimi's pre-tokenizer pieces) so that the
tests exercise real multi-byte tokens, including some that stop inside a UTF-8 character."""

from __future__ import annotations

import json
from collections import Counter
from itertools import pairwise
from pathlib import Path

from ..checkpoint.tiktoken_vocab import KIMI_PAT_STR, NUM_RESERVED_SPECIALS, VOCAB_FILE, write_ranks
from .tokenizer import TEXT as ENGLISH

MIN_VOCAB = 256 + NUM_RESERVED_SPECIALS  # the byte tokens and the special block; 0 merges
DEFAULT_VOCAB = 1024  # 512 merges: enough that common words and some Han/Cyrillic pairs are one token

TEXT = ENGLISH + """专家混合模型把每个词元送到少数几个专家。一层中的专家彼此相似，共享的基底可以容纳它们的结构。
基底专家混合之后经过激活函数，每个专家保留自己的小变换。模型太大放不进内存时，逐层从磁盘读取。
日本語のテキストも少し入れておきます。専門家の混合モデルは大きいです。
Модель смеси экспертов направляет каждый токен к нескольким экспертам. Эксперты слоя похожи друг на друга.
نموذج خليط الخبراء يوجه كل رمز إلى عدد قليل من الخبراء.
def forward(x, experts, weights):
    return sum(w * e(x) for w, e in zip(weights, experts))  # 12345678 + 3.14159 = 12345681.14159
""" * 3

# Kimi-like special tokens: (offset from the first special id, name). Unlisted ids in the reserved
# block get Kimi's `<|reserved_token_{id}|>` names at load time.
SPECIALS = [(0, "[BOS]"), (1, "[EOS]"), (2, "<|im_end|>"), (3, "<|im_user|>"), (4, "<|im_assistant|>"),
            (6, "<|start_header_id|>"), (7, "<|end_header_id|>"), (9, "[EOT]"), (10, "<|im_system|>"),
            (17, "<|im_middle|>")]

# Same shape as Kimi's: a default system turn, role markers, <|im_middle|> between role and content,
# <|im_end|> closing each turn, and the assistant marker as the generation prompt.
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if loop.first and message['role'] != 'system' -%}"
    "<|im_system|>system<|im_middle|>You are a helpful assistant<|im_end|>"
    "{%- endif -%}"
    "{%- if message['role'] == 'user' -%}<|im_user|>user"
    "{%- elif message['role'] == 'assistant' -%}<|im_assistant|>assistant"
    "{%- else -%}<|im_system|>{{ message['role'] }}"
    "{%- endif -%}"
    "<|im_middle|>{{ message['content'] }}<|im_end|>"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|im_assistant|>assistant<|im_middle|>{%- endif -%}"
)


def learn_merges(text: str, num_tokens: int) -> list[bytes]:
    """Tokens in rank order: the 256 bytes, then the most frequent adjacent pair of each round merged
    (ties broken by the pair's bytes, so the result is the same on every machine)."""
    import regex  # tiktoken's own dependency; V1 understands the `&&` class intersections in Kimi's pattern

    tokens = [bytes([b]) for b in range(256)]
    known = set(tokens)
    words = Counter(tuple(bytes([b]) for b in piece.encode("utf-8"))
                    for piece in regex.findall(KIMI_PAT_STR, text, flags=regex.V1))
    while len(tokens) < num_tokens:
        pairs: Counter = Counter()
        for word, n in words.items():
            for pair in pairwise(word):
                pairs[pair] += n
        if not pairs:
            raise ValueError(f"the built-in text yields only {len(tokens)} base tokens: vocab_size can be at most "
                             f"{len(tokens) + 256}")
        a, b = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))[0]
        if a + b not in known:
            tokens.append(a + b)
            known.add(a + b)
        words = Counter({_merge(w, a, b): n for w, n in words.items()})
    return tokens


def _merge(word: tuple, a: bytes, b: bytes) -> tuple:
    out, i = [], 0
    while i < len(word):
        if i + 1 < len(word) and word[i] == a and word[i + 1] == b:
            out.append(a + b)
            i += 2
        else:
            out.append(word[i])
            i += 1
    return tuple(out)


def write_kimi_tokenizer(out_dir: Path, vocab_size: int) -> dict[str, int]:
    """Write tiktoken.model + tokenizer_config.json for a model of `vocab_size` (= base tokens + 256, as
    Kimi-K2's 163840 = 163584 + 256). Returns special name -> id for the config files."""
    if vocab_size < MIN_VOCAB:
        raise ValueError(f"a tiktoken vocabulary needs vocab_size >= {MIN_VOCAB} (256 bytes + 256 specials)")
    num_base = vocab_size - 256
    write_ranks(Path(out_dir) / VOCAB_FILE, learn_merges(TEXT, num_base))
    ids = {name: num_base + off for off, name in SPECIALS}
    added = {str(i): {"content": name, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                      "special": True} for name, i in ids.items()}
    cfg = {"added_tokens_decoder": added, "additional_special_tokens": [n for _, n in SPECIALS[2:]],
           "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": None, "unk_token": None,
           "chat_template": CHAT_TEMPLATE, "clean_up_tokenization_spaces": False, "model_max_length": 1024,
           "tokenizer_class": "TikTokenTokenizer",
           "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]}}
    (Path(out_dir) / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    return ids
