"""/tokenize and /detokenize (vLLM's routes): the tokens a completion prompt or a chat conversation is sent as,
and the text of token ids."""

from __future__ import annotations

from ringllm.app import chat as chat_io
from ringllm.app.errors import ApiError
from ringllm.app.schemas import DetokenizeRequest, TokenizeRequest
from ringllm.app.served_model import ServedModel
from ringllm.ipc.sampling import FieldError, check_token_ids


class TokenizeService:
    def __init__(self, model: ServedModel):
        self.model = model

    async def tokenize(self, body: TokenizeRequest) -> dict:
        """A `prompt` as /v1/completions tokenizes it (special tokens added), or `messages` as the chat route
        renders them (none added: the template writes its own); `add_special_tokens` chooses."""
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "give either prompt or messages", param="prompt")
        tok = self.model.tokenizer
        text, special = body.prompt, body.add_special_tokens
        if body.messages is not None:
            messages = chat_io.template_messages(body.messages, tok.template_text)
            try:
                text = tok.apply_chat_template(messages)
            except Exception as e:  # no template, or one that rejects the conversation
                raise ApiError(400, f"chat template failed: {e}", param="messages") from None
        special = body.messages is None if special is None else special
        encode = tok.encode_chat if body.messages is not None and not special else None
        assert text is not None  # the prompt, or the rendered messages
        ids = await self.model.tokenize(text, add_special_tokens=special, bound=False, encode=encode)
        return {"tokens": ids, "count": len(ids), "max_model_len": self.model.max_seq_len}

    def detokenize(self, body: DetokenizeRequest) -> dict:
        tok = self.model.tokenizer
        try:
            check_token_ids(tok.vocab_size, [body.tokens], field="tokens")  # the ids this tokenizer can decode
        except FieldError as e:
            raise ApiError.bad_field(e) from None
        return {"prompt": tok.decode(body.tokens)}
