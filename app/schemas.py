"""OpenAI request and response bodies as msgspec Structs: one definition validates, encodes and documents.
The bounds below are checked by msgspec as a body is decoded and appear in the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from ipc.sampling import MAX_LOGPROBS, MAX_STOP_SEQUENCES, SamplingFields, SamplingParams, Text, TokenId

MAX_N = 16
MAX_PROMPTS = 64


class Message(msgspec.Struct):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str


class StreamOptions(msgspec.Struct):
    include_usage: bool = False


class _Sampling(SamplingFields, kw_only=True):
    """What both endpoints take: the engine's sampling fields as declared in ipc/sampling.py (inherited, with
    their bounds), plus the OpenAI fields below, which `sampling_params` maps onto the engine's."""

    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: Text | Annotated[list[Text], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    def sampling_params(self, **engine_fields) -> SamplingParams:
        """The engine's parameters for this body: every shared field as it is, `stop` as a list, and
        `engine_fields` (max_tokens once it is checked against the context, logprobs as the engine counts them).
        Raises ValueError naming a bad field."""
        shared = {name: getattr(self, name) for name in SamplingFields.__struct_fields__}
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(**shared, stop=stop, **engine_fields)


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str | TokenId | list[TokenId]]  # a string, strings, token ids, or lists of token ids
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None  # the chosen token's logprob and the top k
    echo: bool = False  # the prompt comes back before the completion (with its tokens' logprobs, if asked)


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class CompletionResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    object: str = "text_completion"


class ChatMessageOut(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None


class ChatResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"


class ChatChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
