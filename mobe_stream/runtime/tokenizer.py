"""Tokenizer from tokenizer.json (the `tokenizers` library), with EOS ids from every usual place."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError


class Tokenizer:
    def __init__(self, model_dir: str | Path, config: dict | None = None):
        d = Path(model_dir)
        if not d.is_dir():
            raise CheckpointError("model directory does not exist or is not a directory", d)
        path = d / "tokenizer.json"
        if not path.is_file():
            if (d / "tiktoken.model").is_file():
                raise CheckpointError("has only a tiktoken tokenizer (tiktoken.model, as Kimi-K2 ships); tiktoken "
                                      "tokenizers are not supported: add a tokenizer.json (e.g. converted with "
                                      "transformers) to run generate/eval", d)
            raise CheckpointError("no tokenizer.json found (generate/eval need one)", d)
        from tokenizers import Tokenizer as _Tok

        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            raise CheckpointError(f"cannot load tokenizer ({e})", path) from None
        self.eos_ids = self._eos_ids(d, config or {})

    def _eos_ids(self, d: Path, config: dict) -> set[int]:
        ids: set[int] = set()
        sources = [config]
        for name in ("generation_config.json", "tokenizer_config.json"):
            try:
                sources.append(json.loads((d / name).read_text()))
            except (OSError, ValueError):
                pass
        for src in sources:
            eos = src.get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else [e for e in eos or [] if isinstance(e, int)])
            tok = src.get("eos_token")
            tok = tok.get("content") if isinstance(tok, dict) else tok
            if isinstance(tok, str) and self.tok.token_to_id(tok) is not None:
                ids.add(self.tok.token_to_id(tok))
        return ids

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


class StreamDecoder:
    """Turns a growing id list into newly printable text (holds back incomplete UTF-8 sequences)."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.ids, self.sent = tok, [], 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new
