"""The `tiktoken.model` vocabulary format (Kimi-K2) and Kimi's special-token layout: read, validate, write.

Kimi-K2 ships no tokenizer.json, only this file (one `<base64 token bytes> <rank>` per line) and a
`tokenization_kimi.py` that we never execute. Everything that code decides and we need (the split
pattern, where special ids start, what unlisted specials are called) is restated here, once, so the
runtime reads and the synthetic factory writes the same layout. Pure stdlib: no tiktoken import.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path

from ..errors import CheckpointError

VOCAB_FILE = "tiktoken.model"

# Kimi's pre-tokenizer split pattern, restated from `TikTokenTokenizer.pat_str` in the public
# tokenization_kimi.py of moonshotai/Kimi-K2-Instruct (Hugging Face hub). Han runs come first and are
# subtracted from the letter classes (`&&[^\p{Han}]`, a class intersection in tiktoken's Rust regex
# engine), so "中文English" splits into "中文" + "English"; digits go in groups of 1-3.
_HAN = r"[\p{Han}]+"
_UPPER = r"[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_LOWER = r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]"
_CONTRACTION = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
KIMI_PAT_STR = "|".join([
    _HAN,
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}*{_LOWER}+{_CONTRACTION}",  # "Word", "word", " word's"
    rf"[^\r\n\p{{L}}\p{{N}}]?{_UPPER}+{_LOWER}*{_CONTRACTION}",  # "WORD", "WORDs"
    r"\p{N}{1,3}",
    r" ?[^\s\p{L}\p{N}]+[\r\n]*",  # punctuation runs, with trailing newlines
    r"\s*[\r\n]+",
    r"\s+(?!\S)",
    r"\s+",
])

# tokenization_kimi.py gives ids len(ranks) .. len(ranks) + 256 + 1 to special tokens: those named in
# tokenizer_config.json's added_tokens_decoder, the rest `<|reserved_token_{id}|>`. (Kimi-K2's config
# vocab_size is len(ranks) + 256, so the last two reserved ids have no embedding row; they are never
# produced because their names never occur in a chat template.)
NUM_RESERVED_SPECIALS = 256 + 2


def read_ranks(path: str | Path) -> dict[bytes, int]:
    """token bytes -> rank, every line validated. Ranks must be exactly 0..n-1 (special ids start at n)
    and every single byte must be a token (tiktoken panics, not raises, on a byte it cannot encode)."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read tiktoken vocabulary ({e.strerror})", path) from None
    ranks: dict[bytes, int] = {}
    seen: dict[int, int] = {}  # rank -> line number
    for no, line in enumerate(data.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split()
        if len(parts) != 2 or not parts[1].isdigit():
            raise CheckpointError(f"line {no}: expected '<base64 token> <rank>', got {_show(line)}", path)
        try:
            token = base64.b64decode(parts[0], validate=True)
        except (binascii.Error, ValueError):
            raise CheckpointError(f"line {no}: token {_show(parts[0])} is not valid base64", path) from None
        rank = int(parts[1])
        if not token:
            raise CheckpointError(f"line {no}: empty token", path)
        if token in ranks:
            raise CheckpointError(f"line {no}: token {_show(parts[0])} repeats line {seen[ranks[token]]}", path)
        if rank in seen:
            raise CheckpointError(f"line {no}: rank {rank} repeats line {seen[rank]}", path)
        ranks[token], seen[rank] = rank, no
    if not ranks:
        raise CheckpointError("tiktoken vocabulary holds no tokens", path)
    if max(seen) != len(ranks) - 1:
        missing = next(r for r in range(len(ranks)) if r not in seen)
        raise CheckpointError(f"ranks must be 0..{len(ranks) - 1} without gaps; rank {missing} is missing", path)
    absent = [b for b in range(256) if bytes([b]) not in ranks]
    if absent:
        raise CheckpointError(f"{len(absent)} single-byte tokens are missing (first: 0x{absent[0]:02x}); "
                              "every byte needs a token", path)
    return ranks


def _show(raw: bytes) -> str:
    text = raw.decode("utf-8", "replace")
    return repr(text if len(text) <= 40 else text[:40] + "...")


def write_ranks(path: str | Path, tokens: list[bytes]) -> None:
    """Write tokens in rank order (rank = position), as Kimi's file is laid out."""
    lines = (f"{base64.b64encode(t).decode('ascii')} {rank}\n" for rank, t in enumerate(tokens))
    Path(path).write_text("".join(lines), encoding="ascii")


def special_tokens(num_base: int, tokenizer_config: dict, config_path: str | Path) -> dict[str, int]:
    """name -> id: added_tokens_decoder's names over Kimi's reserved block, unlisted ids named
    `<|reserved_token_{id}|>`. A listed id inside the base vocabulary, or one name given two ids, would
    make ids ambiguous: refused, naming tokenizer_config.json."""
    added = tokenizer_config.get("added_tokens_decoder") or {}
    if not isinstance(added, dict):
        raise CheckpointError("added_tokens_decoder must be an object (id -> {\"content\": ...})", config_path)
    listed: dict[int, str] = {}
    for key, entry in added.items():
        content = entry.get("content") if isinstance(entry, dict) else None
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or not isinstance(content, str) or not content:
            raise CheckpointError(f"added_tokens_decoder[{key!r}]: expected a numeric id with a \"content\" string",
                                  config_path)
        tid = int(key)
        if tid < num_base:
            raise CheckpointError(f"added token {content!r} has id {tid}, inside the {num_base}-token base "
                                  f"vocabulary of {VOCAB_FILE}", config_path)
        listed[tid] = content
    ids = set(range(num_base, num_base + NUM_RESERVED_SPECIALS)) | set(listed)
    out: dict[str, int] = {}
    for tid in sorted(ids):
        name = listed.get(tid, f"<|reserved_token_{tid}|>")
        if name in out:
            raise CheckpointError(f"special token {name!r} is given two ids ({out[name]} and {tid})", config_path)
        out[name] = tid
    return out
