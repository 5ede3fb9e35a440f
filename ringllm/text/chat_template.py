"""Chat templates, rendered by transformers' own `render_jinja_template` (the environment `apply_chat_template`
uses: loopcontrols, its tojson, strftime_now, raise_exception), so a template renders here exactly as it does in
transformers; neither it nor jinja2 loads torch. The chat route, /tokenize and `ringllm generate --chat` all
prompt the model through `chat_prompt_ids` or its two halves (Tokenizer.apply_chat_template, Tokenizer.encode_chat).

Control tokens in message content: by default text such as "<|im_end|>" in a message becomes the real control
token, as in transformers and vLLM. With `sanitize_control_tokens` (`--sanitize-control-tokens`) the control
tokens that appear in messages, tools and template variables are encoded as plain text, so only the template's
own markers are control tokens (transformers' `apply_chat_template(..., sanitize_control_tokens=True)`): they
are wrapped in private-use markers before rendering, and the tokenizer encodes what it finds between markers
as text (Tokenizer.encode_chat)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ringllm.text.tokenizer import Tokenizer

# Private-use markers around control tokens found in user strings (the same code points transformers uses).
MARK_START, MARK_END = "\U000f0000", "\U000f0001"
# What transformers passes every template besides the conversation: the tokenizer's special tokens.
SPECIAL_VARIABLES = ("bos_token", "eos_token", "unk_token", "pad_token")


class ChatTemplateError(ValueError):
    """A chat template that cannot be used (it does not compile, or the model has none)."""


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
    raise ChatTemplateError(f"--chat-template {value!r}: no such file, and not template text")


class ChatTemplate:
    """A model's chat template (`source`, None when it has none) with the variables transformers gives every
    template (`tokenizer_config`'s special tokens) and, when sanitizing, the control tokens to mark."""

    def __init__(self, source: str | None, tokenizer_config: dict, control_tokens: list[str] | None = None):
        self.source = source
        if source:
            _check_compiles(source)
        self.special = {k: v for k in SPECIAL_VARIABLES if (v := _token_text(tokenizer_config.get(k))) is not None}
        tokens = sorted(control_tokens or [], key=len, reverse=True)  # longest first: a token wins over a part
        self.control = re.compile("|".join(map(re.escape, tokens)) or "(?!)") if control_tokens is not None else None

    @property
    def sanitizes(self) -> bool:
        return self.control is not None

    def render(self, messages: list[dict], tools: list[dict] | None = None, **variables) -> str:
        """As transformers' apply_chat_template(..., tokenize=False, add_generation_prompt=True): `tools` and any
        extra keyword (e.g. enable_thinking) are variables of the template; add_generation_prompt=False and
        continue_final_message=True are transformers' own. When sanitizing, control tokens from
        the inputs come back wrapped in the markers."""
        from transformers.utils.chat_template_utils import render_jinja_template

        if not self.source:
            raise ChatTemplateError("this model has no chat template; use /v1/completions (or give --chat-template)")
        if self.control is not None:
            messages, tools, variables = (
                _mark(messages, self.control),
                _mark(tools, self.control),
                _mark(variables, self.control),
            )
        rendered, _ = render_jinja_template(
            conversations=[messages],
            tools=tools,
            chat_template=self.source,
            **{"add_generation_prompt": True, **self.special, **variables},  # the caller may say otherwise
        )
        return rendered[0]


def chat_prompt_ids(
    tokenizer: Tokenizer, messages: list[dict], tools: list[dict] | None = None, **variables
) -> list[int]:
    """The token ids a conversation prompts the model with: the template's text, tokenized as it is (no special
    tokens added: the template writes its own). `ringllm generate --chat` and the chat route share it."""
    return tokenizer.encode_chat(tokenizer.apply_chat_template(messages, tools, **variables))


def marked_pieces(rendered: str) -> list[str | None]:
    """[text, marked token, text, ...] of a rendered chat; None in place of the token for a lone marker a
    template split off."""
    return re.split(f"{MARK_START}(.*?){MARK_END}|[{MARK_START}{MARK_END}]", rendered)


def template_literals(source: str) -> str:
    """The text a template writes itself (its data and string constants), to find the added tokens it uses."""
    import jinja2

    env = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"])
    try:
        ast = env.parse(source)
    except jinja2.TemplateError:
        return source
    return "\0".join(
        [n.data for n in ast.find_all(jinja2.nodes.TemplateData)]
        + [n.value for n in ast.find_all(jinja2.nodes.Const) if isinstance(n.value, str)]
    )


def _check_compiles(source: str) -> None:
    """A template that does not compile fails at start, not on the first chat request."""
    import jinja2
    from transformers.utils.chat_template_utils import _compile_jinja_template

    try:
        _compile_jinja_template(source)
    except jinja2.TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not compile: {e} (line {e.lineno})") from None


def _mark(obj: Any, pattern: re.Pattern) -> Any:
    """Wraps every control token in user strings (values, not dict keys) in the markers; markers a user sent
    are dropped first, so they cannot forge one."""
    if isinstance(obj, str):
        obj = obj.replace(MARK_START, "").replace(MARK_END, "")
        return pattern.sub(lambda m: f"{MARK_START}{m.group(0)}{MARK_END}", obj)
    if isinstance(obj, dict):
        return {k: _mark(v, pattern) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_mark(v, pattern) for v in obj]
    return obj


def _token_text(value) -> str | None:
    return value.get("content") if isinstance(value, dict) else value
