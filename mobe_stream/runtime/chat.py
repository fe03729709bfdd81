"""Chat prompts from the model's own `chat_template`, rendered in jinja2's immutable sandbox.

A template is data from the checkpoint, not code we trust: the sandbox refuses attribute tricks and
mutation, and any failure inside it becomes one line naming the file the template came from. The
environment mirrors the one transformers renders templates in (trim/lstrip blocks, loop controls,
`raise_exception`, a `tojson` that keeps non-ASCII text), so hub templates render the same."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError, ConfigError

TEMPLATE_FILE = "chat_template.jinja"


def find_template(model_dir: Path, tokenizer_config: dict, config_path: Path) -> tuple[str, Path]:
    """(template source, file it came from): chat_template.jinja first (newer hub layout), then
    tokenizer_config.json's `chat_template` (a string, or a list of named templates: "default")."""
    f = model_dir / TEMPLATE_FILE
    if f.is_file():
        try:
            return f.read_text(encoding="utf-8"), f
        except (OSError, UnicodeDecodeError) as e:
            raise CheckpointError(f"cannot read chat template ({e})", f) from None
    t = tokenizer_config.get("chat_template")
    if isinstance(t, list):
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    if isinstance(t, str) and t.strip():
        return t, config_path
    raise ConfigError(f"--chat: the model has no chat template (no {TEMPLATE_FILE}, no chat_template in "
                      f"{config_path.name})", model_dir)


def render(template: str, source: Path, prompt: str, bos_token: str, eos_token: str) -> str:
    """One user turn plus the assistant's generation prompt, as the template writes them."""
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda x, indent=None: json.dumps(x, ensure_ascii=False, indent=indent)
    try:
        compiled = env.from_string(template)
        return compiled.render(messages=[{"role": "user", "content": prompt}], add_generation_prompt=True,
                               bos_token=bos_token, eos_token=eos_token)
    except Exception as e:  # anything a foreign template raises is the checkpoint's fault, reported in one line
        detail = " ".join(str(e).split()) or type(e).__name__
        raise CheckpointError(f"chat template failed to render ({detail})", source) from None
