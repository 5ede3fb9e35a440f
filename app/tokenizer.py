"""The tokenizer as the app workers use it: the checkpoint's tokenizer.json through `tokenizers` and its
chat template through jinja2, so that an app worker never loads transformers (nor torch)."""

from __future__ import annotations

import json
from pathlib import Path

import jinja2
import jinja2.sandbox
from tokenizers import Tokenizer


class AppTokenizer:
    def __init__(self, model_path: str | Path):
        path = Path(model_path)
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
        env.globals["raise_exception"] = _raise
        self.chat_template = env.from_string(template) if template else None
        self.special = {k: _token_text(cfg.get(k)) for k in ("bos_token", "eos_token")}

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if self.chat_template is None:
            raise ValueError("this model has no chat template; use /v1/completions")
        return self.chat_template.render(messages=messages, add_generation_prompt=True, **self.special)

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value


def _raise(message: str):
    raise jinja2.TemplateError(message)
