"""/tokenize and /detokenize (vLLM's routes): the tokens a completion prompt or a chat conversation is sent as,
and the text of token ids. Both are bounded by the model's context, as the generation routes are: a text longer
than the context can hold (in characters, at the tokenizer's longest token), more messages or more token ids than
the context has tokens are a 400 naming the limit, refused before the work (tokenizing megabytes costs ~250 bytes a
token and seconds of CPU: app/served_model.py)."""

from __future__ import annotations

import msgspec

from ringllm.app import chat as chat_io
from ringllm.app.errors import ApiError
from ringllm.app.schemas import DetokenizeRequest, TokenizeRequest
from ringllm.app.served_model import ServedModel
from ringllm.ipc.sampling import FieldError, check_token_ids

# The fields only a conversation has: beside a prompt they are refused by name.
CHAT_ONLY = ("add_generation_prompt", "continue_final_message", "tools", "chat_template_kwargs")
# The template variables the route sets from the body's own fields.
RESERVED = chat_io.RESERVED_TEMPLATE_VARIABLES | {"continue_final_message"}


class TokenizeService:
    def __init__(self, model: ServedModel):
        self.model = model

    async def tokenize(self, body: TokenizeRequest, extras: list[dict] | None = None) -> dict:
        """A `prompt` as /v1/completions tokenizes it (special tokens added), or `messages` as the chat route
        renders them (none added: the template writes its own); `add_special_tokens` chooses. vLLM's answer:
        the ids, their count, the context, and with `return_token_strs` each id's token string."""
        self.model.check_name(body.model)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        tok = self.model.require_tokenizer(what="/tokenize")
        text: str | None
        if body.messages is not None:
            self.model.check_count(len(body.messages), "messages", "messages")
            text, special = self._render(body, extras), bool(body.add_special_tokens)
        else:
            for field in CHAT_ONLY:
                if getattr(body, field) is not None:
                    raise ApiError(400, f"{field} applies to messages, not to a prompt", param=field)
            text, special = body.prompt, body.add_special_tokens is not False
        encode = tok.encode_chat if body.messages is not None and not special else None
        assert text is not None  # the prompt, or the rendered messages
        param = "prompt" if body.messages is None else "messages"
        ids = await self.model.tokenize(text, add_special_tokens=special, encode=encode, param=param)
        strs = [tok.backend.id_to_token(i) for i in ids] if body.return_token_strs else None
        return {"count": len(ids), "max_model_len": self.model.max_seq_len, "tokens": ids, "token_strs": strs}

    def _render(self, body: TokenizeRequest, extras: list[dict] | None) -> str:
        """The conversation as the chat route's template renders it, with vLLM's tokenize options: the
        assistant's turn opened (add_generation_prompt, default true) or the last turn left open to be
        continued (continue_final_message; not both), the tools shown, extra template variables."""
        assert body.messages is not None
        generation = body.add_generation_prompt is not False
        if body.continue_final_message and generation:
            raise ApiError(
                400,
                "continue_final_message and add_generation_prompt cannot both be true "
                "(set add_generation_prompt to false to continue the last message)",
                param="continue_final_message",
            )
        variables = dict(body.chat_template_kwargs or {})
        if clash := sorted(RESERVED & variables.keys()):
            raise ApiError(400, f"chat_template_kwargs may not set {', '.join(clash)}", param="chat_template_kwargs")
        tok = self.model.tokenizer
        messages = chat_io.template_messages(body.messages, tok.template_text, extras)
        tools = [{"type": "function", "function": msgspec.to_builtins(t.function)} for t in body.tools or []]
        try:
            return tok.apply_chat_template(
                messages,
                tools or None,
                add_generation_prompt=generation,
                continue_final_message=bool(body.continue_final_message),
                **variables,
            )
        except Exception as e:  # no template, or one that rejects the conversation
            raise ApiError(400, f"chat template failed: {e}", param="messages") from None

    def detokenize(self, body: DetokenizeRequest) -> dict:
        self.model.check_name(body.model)
        self.model.check_count(len(body.tokens), "token ids", "tokens")
        tok = self.model.require_tokenizer(what="/detokenize")
        try:
            check_token_ids(tok.vocab_size, [body.tokens], field="tokens")  # the ids this tokenizer can decode
        except FieldError as e:
            raise ApiError.bad_field(e) from None
        return {"prompt": tok.decode(body.tokens)}
