"""OpenAI response bodies (and vLLM's additions to them) as msgspec Structs: what the routes encode, whole or as
a stream's chunks, and the error body. The request bodies are in app/schemas.py."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None


class PromptLogprob(msgspec.Struct):
    """vLLM's Logprob, as its prompt_logprobs carry them: a token's logprob, its rank (1: the likeliest) and text."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's prompt_logprobs: None for the first prompt token (it has no context), then per prompt token a map from
# token id to its logprob: the prompt token's own and the top k there.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # only when the request asked for them


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


class FunctionOut(msgspec.Struct, omit_defaults=True):
    name: str | None = None
    arguments: str | None = None


class ToolCallOut(msgspec.Struct, omit_defaults=True):
    """A tool call in an answer; in a stream's delta, `index` says which call a fragment belongs to."""

    function: FunctionOut
    id: str | None = None
    type: str | None = None
    index: int | None = None


class ChatMessageOut(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None


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
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # vLLM's, once for the conversation; only when asked


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
