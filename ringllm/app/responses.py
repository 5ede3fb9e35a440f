"""OpenAI response bodies (and vLLM's additions to them) as msgspec Structs: what the routes encode, whole or as
a stream's chunks, and the error body. The request bodies are in app/schemas.py."""

from __future__ import annotations

import msgspec
from msgspec import UNSET, UnsetType


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int  # prompt tokens whose KV came from the prefix cache


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionLogprobs(msgspec.Struct):
    tokens: list[str]
    token_logprobs: list[float | None]  # None for an echoed prompt's first token
    top_logprobs: list[dict[str, float] | None] | None
    # each token's offset in the choice's text (echoed prompt included): in a stream, from the text sent before
    text_offset: list[int]


class PromptLogprob(msgspec.Struct):
    """vLLM's Logprob, as its prompt_logprobs carry them: a token's logprob, its rank (1: the likeliest) and text."""

    logprob: float
    rank: int
    decoded_token: str | None  # None from a server without a tokenizer (--skip-tokenizer-init), as vLLM's


# vLLM's prompt_logprobs: None for the first prompt token (it has no context), then per prompt token a map from
# token id to its logprob: the prompt token's own and the top k there.
PromptLogprobs = list[dict[int, PromptLogprob] | None]


class CompletionChoice(msgspec.Struct):
    """A whole answer's choice: vLLM's keys are always there, null unless the request asked for them."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_logprobs: PromptLogprobs | None = None
    prompt_token_ids: list[int] | None = None  # return_token_ids
    token_ids: list[int] | None = None  # return_token_ids: the completion's, its last (EOS, a stop token) included


class CompletionStreamChoice(msgspec.Struct):
    """A stream's choice: vLLM's keys only when asked for (the prompt's ids in the choice's first chunk)."""

    index: int
    text: str
    finish_reason: str | None
    logprobs: CompletionLogprobs | None = None
    prompt_token_ids: list[int] | UnsetType = UNSET
    token_ids: list[int] | UnsetType = UNSET


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
    # OpenAI's keys for what ringllm does not have (one tier, no fingerprint): null, as vLLM sends them
    service_tier: str | None = None
    system_fingerprint: str | None = None


class CompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[CompletionStreamChoice]
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


class ChatMessage(msgspec.Struct):
    """A whole answer's message with every key of OpenAI's (and vLLM's reasoning_content), null where it does not
    apply, as vLLM sends them: a client that reads the raw body sees the keys its SDK's model has."""

    role: str | None
    content: str | None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallOut] | None = None
    refusal: str | None = None  # ringllm's model does not refuse through the API
    annotations: list | None = None  # web-search citations: ringllm has no search
    audio: dict | None = None  # text only
    function_call: FunctionOut | None = None  # OpenAI's deprecated single call: ringllm answers with tool_calls

    @classmethod
    def of(cls, message: ChatMessageOut) -> ChatMessage:
        return cls(message.role, message.content, message.reasoning_content, message.tool_calls)


class ChatChoice(msgspec.Struct):
    index: int
    message: ChatMessage
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | None = None  # return_token_ids: the answer's, its end-of-turn token included


class ChatStreamChoice(msgspec.Struct):
    index: int
    delta: ChatMessageOut
    finish_reason: str | None
    logprobs: ChatLogprobs | None = None
    token_ids: list[int] | UnsetType = UNSET  # return_token_ids: this delta's


class ChatResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage | None = None
    object: str = "chat.completion"
    service_tier: str | None = None  # as CompletionResponse's
    system_fingerprint: str | None = None
    metadata: dict | None = None  # OpenAI's stored-completion metadata: refused in requests, so always null
    moderation: dict | None = None  # OpenAI's moderation verdict: ringllm has no moderation
    prompt_logprobs: PromptLogprobs | None = None  # vLLM's, once for the conversation; null unless asked
    prompt_token_ids: list[int] | None = None  # return_token_ids: the conversation as the template wrote it


class ChatChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatStreamChoice]
    usage: Usage | None = None
    object: str = "chat.completion.chunk"
    prompt_token_ids: list[int] | UnsetType = UNSET  # return_token_ids: in the first chunk only


class ErrorBody(msgspec.Struct):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(msgspec.Struct):
    error: ErrorBody
