"""One tokenizer interface for generate/eval over the two vocabularies hub models ship: tokenizer.json
(the `tokenizers` library) or Kimi-K2's tiktoken.model (the `tiktoken` package). The backend is picked
by the files present, tokenizer.json first; EOS ids come from every usual place."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Protocol

from ..checkpoint.tiktoken_vocab import VOCAB_FILE
from ..errors import CheckpointError

CONFIG_FILE = "tokenizer_config.json"


class _Backend(Protocol):
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special: bool) -> str: ...
    def token_id(self, token: str) -> int | None: ...


class _TokenizersBackend:
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as _Tok

        try:
            self.tok = _Tok.from_file(str(path))
        except Exception as e:  # tokenizers raises plain Exceptions for bad files
            raise CheckpointError(f"cannot load tokenizer ({e})", path) from None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special: bool) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special)

    def token_id(self, token: str) -> int | None:
        return self.tok.token_to_id(token)


class Tokenizer:
    """encode / decode / eos_ids / encode_chat. Special-token names in encoded text become special ids
    with either backend (both libraries' and Kimi's own default)."""

    def __init__(self, model_dir: str | Path, config: dict | None = None):
        d = Path(model_dir)
        if not d.is_dir():
            raise CheckpointError("model directory does not exist or is not a directory", d)
        self.model_dir = d
        self.config_path = d / CONFIG_FILE
        self.tokenizer_config = _json_object(self.config_path)
        self._backend: _Backend
        if (d / "tokenizer.json").is_file():
            self.backend = "tokenizers"
            self._backend = _TokenizersBackend(d / "tokenizer.json")
        elif (d / VOCAB_FILE).is_file():
            from .tiktoken_backend import TiktokenBackend

            self.backend = "tiktoken"
            self._backend = TiktokenBackend(d / VOCAB_FILE, self.tokenizer_config, self.config_path)
        else:
            raise CheckpointError(f"no tokenizer found (generate/eval need tokenizer.json or {VOCAB_FILE})", d)
        self.eos_ids = self._eos_ids(d, config or {})

    def _eos_ids(self, d: Path, config: dict) -> set[int]:
        ids: set[int] = set()
        sources = [config, self.tokenizer_config]
        try:
            sources.append(json.loads((d / "generation_config.json").read_text()))
        except (OSError, ValueError):
            pass
        for src in sources:
            if not isinstance(src, dict):
                continue
            eos = src.get("eos_token_id")
            ids.update([eos] if isinstance(eos, int) else [e for e in eos if isinstance(e, int)] if isinstance(eos, list) else [])
            tok = self.special_token(src, "eos_token")
            tid = self.token_id(tok) if tok else None
            if tid is not None:
                ids.add(tid)
        return ids

    @staticmethod
    def special_token(src: dict, key: str) -> str:
        """A tokenizer_config entry such as bos_token: a string or {"content": ...}; "" if absent."""
        tok = src.get(key)
        tok = tok.get("content") if isinstance(tok, dict) else tok
        return tok if isinstance(tok, str) else ""

    def encode(self, text: str) -> list[int]:
        return self._backend.encode(text)

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._backend.decode(ids, skip_special)

    def token_id(self, token: str) -> int | None:
        return self._backend.token_id(token)

    def chat_text(self, prompt: str) -> str:
        """The prompt as one user turn of the model's chat template (ConfigError if it has none)."""
        from .chat import find_template, render

        template, source = find_template(self.model_dir, self.tokenizer_config, self.config_path)
        cfg = self.tokenizer_config
        return render(template, source, prompt, self.special_token(cfg, "bos_token"), self.special_token(cfg, "eos_token"))

    def encode_chat(self, prompt: str) -> list[int]:
        return self.encode(self.chat_text(prompt))


def _json_object(path: Path) -> dict:
    """{} when the file is absent; a present file that is not a JSON object is refused (its special
    tokens and chat template would otherwise silently vanish)."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"cannot read ({e})", path) from None
    try:
        data = json.loads(text)
    except ValueError as e:
        raise CheckpointError(f"not valid JSON ({e})", path) from None
    if not isinstance(data, dict):
        raise CheckpointError("expected a JSON object", path)
    return data


class StreamDecoder:
    """Turns a growing id list into newly printable text. Byte-level tokens can end inside a UTF-8
    character; both backends then decode to a trailing U+FFFD, and only complete characters are sent."""

    def __init__(self, tok: Tokenizer):
        self.tok, self.sent = tok, 0
        self.ids: list[int] = []

    def push(self, token: int) -> str:
        self.ids.append(token)
        text = self.tok.decode(self.ids)
        if text.endswith("\ufffd"):
            return ""
        new, self.sent = text[self.sent:], len(text)
        return new
