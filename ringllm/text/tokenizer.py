"""The one tokenizer loader: where a checkpoint's tokenizer is, and the tokenizer itself, for the API workers,
the offline `LLM` and `ringllm generate` alike. The checkpoint's tokenizer.json goes through `tokenizers`
(Rust, no torch); its chat template is text/chat_template.py's.

The checkpoint may be a directory or a GGUF file (a directory holding one .gguf and no tokenizer.json counts as
that file): a GGUF's tokenizer and chat template are its own metadata, converted once into tokenizer files in
a cache (engine/gguf.py, torch-free), which every process then reads.

The grammar compiler of structured outputs (xgrammar) reads a transformers tokenizer:
`transformers_tokenizer` loads one from the same directory."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer as Backend

from ringllm.text.chat_template import ChatTemplate, marked_pieces, template_literals


class TokenizerError(ValueError):
    """No usable tokenizer at the given path (the message names the file)."""


def tokenizer_directory(path: str | Path) -> Path:
    """The directory to read tokenizer.json and tokenizer_config.json from: `path` itself, or for a GGUF file
    (or a directory holding one and no tokenizer.json) the tokenizer files built from its metadata."""
    from ringllm.engine import gguf  # torch-free: the GGUF reader and its tokenizer cache

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


class Tokenizer:
    """A checkpoint's tokenizer and chat template. `chat_template` (its text) replaces the model's;
    `sanitize_control_tokens` makes control tokens found in chat messages plain text (text/chat_template.py)."""

    def __init__(self, path: str | Path, chat_template: str | None = None, sanitize_control_tokens: bool = False):
        directory = tokenizer_directory(path)
        try:
            self.backend = Backend.from_file(str(directory / "tokenizer.json"))
        except Exception as e:
            raise TokenizerError(f"cannot read {directory / 'tokenizer.json'}: {e}") from e
        cfg_file = directory / "tokenizer_config.json"
        config = json.loads(cfg_file.read_text()) if cfg_file.is_file() else {}
        source = chat_template if chat_template is not None else _model_template(directory, config)
        control = self._control_tokens(source or "") if sanitize_control_tokens else None
        self.chat = ChatTemplate(source, config, control)

    @property
    def template_text(self) -> str | None:
        """The chat template's source: app/chat.py guesses the model's tool-call syntax from it."""
        return self.chat.source

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """`add_special_tokens` adds what the tokenizer's post-processor adds to a text (Llama's BOS), as
        transformers does by default. encode_batch, unlike encode, releases the GIL: a long text tokenized on
        a thread leaves the event loop free."""
        return self.backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        """The ids this tokenizer knows (added tokens included); the model's vocabulary may be larger."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def max_token_chars(self) -> int:
        """The most characters one token stands for: a text of more than context × this cannot fit."""
        return max(map(len, self.backend.get_vocab(with_added_tokens=True)), default=1)

    def apply_chat_template(self, messages: list[dict], tools: list[dict] | None = None, **variables) -> str:
        """The conversation as the template renders it (text/chat_template.py's render: by default ending with the
        assistant's turn opened)."""
        return self.chat.render(messages, tools, **variables)

    def encode_chat(self, rendered: str) -> list[int]:
        """The ids of a rendered chat: as `encode`, except that marked control tokens (when sanitizing) are
        plain text."""
        if not self.chat.sanitizes:
            return self.encode(rendered)
        pieces = marked_pieces(rendered)
        newline = self.encode("\n")
        ids = self.encode(pieces[0] or "")
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
        if as_text and self.backend.token_to_id(piece) in ids:
            raise ValueError(f"cannot encode {piece!r} as plain text: this tokenizer makes it the control token")
        return ids

    def _encode_as_text(self, text: str) -> list[int]:
        t = self.backend
        if t.normalizer is not None:
            text = t.normalizer.normalize_str(text)
        pre = t.pre_tokenizer
        splits = [s for s, _ in pre.pre_tokenize_str(text)] if pre is not None else [text]
        return [token.id for s in splits for token in t.model.tokenize(s)]

    def _control_tokens(self, template: str) -> list[str]:
        """The control tokens: the special added tokens, plus added tokens the template itself writes (like
        `<tool_call>`), as transformers infers them."""
        literal = template_literals(template)
        return [
            t.content
            for t in self.backend.get_added_tokens_decoder().values()
            if t.special or (t.content in literal and not t.content.isspace())
        ]


def _model_template(directory: Path, config: dict) -> str | None:
    """The checkpoint's chat template: tokenizer_config.json's, else chat_template.jinja; of several named
    templates, the default one."""
    template = config.get("chat_template")
    if template is None and (directory / "chat_template.jinja").is_file():
        template = (directory / "chat_template.jinja").read_text()
    if isinstance(template, list):
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    return template


def transformers_tokenizer(path: str | Path):
    """transformers' tokenizer of the same files (xgrammar builds its vocabulary from one); loaded on demand."""
    from transformers import AutoTokenizer

    directory = tokenizer_directory(path)
    try:
        return AutoTokenizer.from_pretrained(str(directory))
    except Exception as e:  # a corrupt or foreign file: transformers' own message, with the path
        raise TokenizerError(f"cannot load the tokenizer at {directory}: {type(e).__name__}: {e}") from e
