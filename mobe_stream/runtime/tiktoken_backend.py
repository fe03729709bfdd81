"""A tiktoken vocabulary (Kimi-K2's `tiktoken.model`) as a tokenizer backend, without running the
checkpoint's tokenization_kimi.py: the file is read and validated by checkpoint.tiktoken_vocab and
handed to the `tiktoken` package with Kimi's split pattern and special-token layout."""

from __future__ import annotations

from pathlib import Path

from ..checkpoint.tiktoken_vocab import KIMI_PAT_STR, read_ranks, special_tokens
from ..errors import CheckpointError

# tokenization_kimi.py encodes at most 400k characters per tiktoken call and cuts runs of more than
# 25k whitespace or non-whitespace characters (tiktoken issue 195: very long runs make its regex
# engine fail). Cutting at the same places keeps our ids identical to Kimi's own tokenizer.
_MAX_CHARS = 400_000
_MAX_RUN = 25_000


class TiktokenBackend:
    def __init__(self, vocab_path: Path, tokenizer_config: dict, config_path: Path):
        try:
            import tiktoken
        except ImportError:
            raise CheckpointError("reading this tiktoken vocabulary needs the `tiktoken` package "
                                  "(pip install tiktoken)", vocab_path) from None
        ranks = read_ranks(vocab_path)
        self.num_base = len(ranks)
        self.specials = special_tokens(self.num_base, tokenizer_config, config_path)
        self.special_ids = frozenset(self.specials.values())
        self.enc = tiktoken.Encoding(vocab_path.name, pat_str=KIMI_PAT_STR, mergeable_ranks=ranks,
                                     special_tokens=self.specials)

    def encode(self, text: str) -> list[int]:
        """Special-token names in the text become their ids, as Kimi's own encode does by default."""
        ids: list[int] = []
        for start in range(0, len(text), _MAX_CHARS):
            for piece in _cap_runs(text[start:start + _MAX_CHARS], _MAX_RUN):
                ids.extend(self.enc.encode(piece, allowed_special="all"))
        return ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        """Ids the vocabulary does not know (a model's vocab_size may exceed it) are dropped; bytes that
        end inside a UTF-8 character decode to U+FFFD, which StreamDecoder holds back."""
        keep = [i for i in ids if 0 <= i < self.num_base or (not skip_special and i in self.special_ids)]
        return self.enc.decode(keep, errors="replace")

    def token_id(self, token: str) -> int | None:
        if token in self.specials:
            return self.specials[token]
        try:
            return self.enc.encode_single_token(token.encode("utf-8"))
        except KeyError:
            return None


def _cap_runs(s: str, cap: int):
    """Cut s so that no piece holds more than `cap` consecutive whitespace or non-whitespace characters."""
    start, run, prev = 0, 0, None
    for i, ch in enumerate(s):
        space = ch.isspace()
        run = run + 1 if space == prev else 1
        prev = space
        if run > cap:
            yield s[start:i]
            start, run = i, 1
    yield s[start:]
