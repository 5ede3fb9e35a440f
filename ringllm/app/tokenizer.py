"""The tokenizer as the app workers use it: the checkpoint's tokenizer.json through `tokenizers`, and its chat
template rendered by transformers' own `render_jinja_template` (the environment `apply_chat_template` uses:
loopcontrols, its tojson, strftime_now, raise_exception), so a template renders here exactly as it does in
transformers. No torch: neither `tokenizers` nor transformers' template helper loads it.

The checkpoint may be a directory or a GGUF file (a directory holding one .gguf counts as that file): a GGUF's
tokenizer and chat template are its own metadata, converted once into tokenizer files (engine/gguf.py).

Control tokens in message content: by default text such as "<|im_end|>" in a message becomes the real control
token, as in transformers and vLLM. With `sanitize_control_tokens` (`--sanitize-control-tokens`) the control
tokens that appear in messages, tools and template variables are encoded as plain text, so only the template's
own markers are control tokens (transformers' `apply_chat_template(..., sanitize_control_tokens=True)`)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

# Private-use markers around control tokens found in user strings (the same code points transformers uses).
_START, _END = "\U000f0000", "\U000f0001"


class TokenizerError(ValueError):
    """No usable tokenizer at the given path (the message names the file)."""


def tokenizer_directory(path: str | Path) -> Path:
    """The directory to read tokenizer.json and tokenizer_config.json from: `path` itself, or for a GGUF file
    (or a directory holding one and no tokenizer.json) the tokenizer files built from its metadata."""
    from ringllm.engine import gguf

    path = Path(path).expanduser()
    if not path.exists():
        raise TokenizerError(f"no tokenizer: {path} does not exist")
    if path.is_dir() and not (path / "tokenizer.json").is_file():
        path = gguf.find_gguf(path) or path
    if gguf.is_gguf(path):
        return gguf.tokenizer_dir(path)
    if not (path / "tokenizer.json").is_file():
        raise TokenizerError(
            f"no tokenizer: {path / 'tokenizer.json'} does not exist (ringllm reads a "
            "checkpoint's tokenizer.json; pass --tokenizer to use another directory)"
        )
    return path


def read_chat_template(value: str) -> str:
    """--chat-template: the contents of the file `value` names, else `value` itself if it is template text."""
    try:
        candidate = Path(value).expanduser()
        if candidate.is_file():
            return candidate.read_text()
    except OSError:  # a long template is not a valid file name
        pass
    if "{{" in value or "{%" in value:
        return value
    raise TokenizerError(f"--chat-template {value!r}: no such file, and not template text")


class AppTokenizer:
    def __init__(self, model_path: str | Path, chat_template: str | None = None, sanitize_control_tokens: bool = False):
        path = tokenizer_directory(model_path)
        try:
            self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        except Exception as e:
            raise TokenizerError(f"cannot read {path / 'tokenizer.json'}: {e}") from e
        cfg_file = path / "tokenizer_config.json"
        cfg = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        template = chat_template if chat_template is not None else cfg.get("chat_template")
        if template is None and (path / "chat_template.jinja").is_file():
            template = (path / "chat_template.jinja").read_text()
        if isinstance(template, list):  # several named templates: the default one
            template = next((t["template"] for t in template if t.get("name") == "default"), None)
        self.template_text = template  # its source: app/chat.py guesses the model's tool-call syntax from it
        if template:
            _check_template(template)
        # What transformers passes every template besides the conversation: its special tokens.
        self.special = {
            k: v
            for k in ("bos_token", "eos_token", "unk_token", "pad_token")
            if (v := _token_text(cfg.get(k))) is not None
        }
        self.sanitize = sanitize_control_tokens
        self._control_re = _control_pattern(self.tok, template or "") if sanitize_control_tokens else None

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`add_special_tokens` adds what the tokenizer's post-processor adds to a text (Llama's BOS), as
        transformers does by default. encode_batch, unlike encode, releases the GIL: a long text tokenized on
        a thread leaves the event loop free."""
        return self.tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text of more than context × this cannot fit."""
        return max(map(len, self.tok.get_vocab(with_added_tokens=True)), default=1)

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, **kwargs) -> str:
        """As transformers' apply_chat_template(..., tokenize=False, add_generation_prompt=True): `tools` and
        any extra keyword (e.g. enable_thinking) are variables of the template. With sanitizing on, control
        tokens from the inputs come back wrapped in markers that `encode_chat` understands."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.template_text:
            raise ValueError("this model has no chat template; use /v1/completions (or give --chat-template)")
        if self._control_re is not None:
            messages, tools, kwargs = (
                _mark(messages, self._control_re),
                _mark(tools, self._control_re),
                _mark(kwargs, self._control_re),
            )
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self.template_text,
            add_generation_prompt=True,
            **{**self.special, **kwargs},
        )
        return rendered[0]

    def encode_chat(self, rendered: str) -> list[int]:
        """The ids of a rendered chat: as `encode`, except that marked control tokens (when sanitizing) are
        plain text."""
        if self._control_re is None:
            return self.encode(rendered)
        # [text, marked token, text, ...], None in place of the token for a lone marker a template split off
        pieces = re.split(f"{_START}(.*?){_END}|[{_START}{_END}]", rendered)
        newline = self.encode("\n")
        ids = self.encode(pieces[0])
        for i, piece in enumerate(pieces[1:], start=1):
            if piece:
                ids += self._encode_piece(piece, as_text=i % 2 == 1, newline=newline)
        return ids

    def _encode_piece(self, piece: str, as_text: bool, newline: list[int]) -> list[int]:
        """A piece from the middle of a chat, encoded after a newline that is then removed (so that a
        sentencepiece vocabulary adds no start-of-text prefix space), as transformers' encode_marked_chat."""
        encode = self._encode_as_text if as_text else self.encode
        ids = encode("\n" + piece)
        if ids[: len(newline)] == newline:
            ids = ids[len(newline) :]
        else:
            ids = encode(piece)
        if as_text and self.tok.token_to_id(piece) in ids:
            raise ValueError(f"cannot encode {piece!r} as plain text: this tokenizer makes it the control token")
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        t = self.tok
        if t.normalizer is not None:
            text = t.normalizer.normalize_str(text)
        pre = t.pre_tokenizer
        splits = [s for s, _ in pre.pre_tokenize_str(text)] if pre is not None else [text]
        return [token.id for s in splits for token in t.model.tokenize(s)]

    @property
    def vocab_size(self) -> int:
        return self.tok.get_vocab_size(with_added_tokens=True)


def _check_template(template: str) -> None:
    """A template that does not compile fails at start, not on the first chat request."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(template)
    except jinja2.TemplateSyntaxError as e:
        raise TokenizerError(f"the chat template does not compile: {e} (line {e.lineno})") from None


def _control_pattern(tok: Tokenizer, template: str) -> re.Pattern:
    """The control tokens: the special added tokens, plus added tokens the template itself writes (like
    `<tool_call>`), as transformers infers them; longest first, so a token wins over one it contains."""
    import jinja2

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        ast = env.parse(template)
        literal = "\0".join(
            [n.data for n in ast.find_all(jinja2.nodes.TemplateData)]
            + [n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)]
        )
    except jinja2.TemplateError:
        literal = template
    tokens = [
        t.content
        for t in tok.get_added_tokens_decoder().values()
        if t.special or (t.content in literal and not t.content.isspace())
    ]
    tokens.sort(key=len, reverse=True)
    return re.compile("|".join(map(re.escape, tokens)) or "(?!)")


def _mark(obj: Any, pattern: re.Pattern) -> Any:
    """Wraps every control token in user strings (values, not dict keys) in the markers; markers a user sent
    are dropped first, so they cannot forge one."""
    if isinstance(obj, str):
        obj = obj.replace(_START, "").replace(_END, "")
        return pattern.sub(lambda m: f"{_START}{m.group(0)}{_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern) for v in obj]
    return obj


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
