"""OpenAI request and response bodies as msgspec Structs: one definition validates, encodes and documents.
The bounds below are checked by msgspec as a body is decoded and appear in the OpenAPI document."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

from ringllm.ipc.sampling import (
    MAX_LOGPROBS,
    MAX_STOP_SEQUENCES,
    FieldError,
    SamplingFields,
    SamplingParams,
    StructuredOutputs,
    Text,
    TokenId,
)

MAX_N = 16
MAX_PROMPTS = 64


class ContentPart(msgspec.Struct, kw_only=True):
    """A part of a message's content. Only text parts are served; the route names any other type in a 400."""

    type: str
    text: str | None = None


class FunctionCall(msgspec.Struct, forbid_unknown_fields=True):
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it


class ToolCallIn(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """A tool call of an earlier assistant turn, sent back in the conversation."""

    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class Message(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[ContentPart] | None = None  # None only for an assistant turn that calls tools
    name: str | None = None
    tool_calls: list[ToolCallIn] | None = None  # assistant turns
    tool_call_id: str | None = None  # tool turns: the call this result answers
    reasoning_content: str | None = None  # an earlier assistant turn's reasoning, for templates that show it
    # What an OpenAI answer's message carries besides, so that clients can send it back as they got it:
    refusal: str | None = None  # a refusal's text: the turn's content when it has none
    annotations: list | None = None  # citations; nothing a template shows
    audio: None = None  # only null: audio is not served
    function_call: None = None  # only null: the deprecated form of tool_calls is not served


class FunctionDef(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    name: Annotated[str, Meta(pattern=r"^[a-zA-Z0-9_.-]{1,64}$")]
    description: str | None = None
    parameters: dict | None = None  # a JSON schema of the arguments object
    strict: bool | None = None


class Tool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDef


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, forbid_unknown_fields=True):
    type: Literal["function"]
    function: NamedFunction


class StreamOptions(msgspec.Struct, forbid_unknown_fields=True):
    include_usage: bool = False
    include_obfuscation: Any = None  # refused unless null or false (see NOT_IMPLEMENTED)


# OpenAI fields that ringllm does not implement. Each is accepted only at a value that asks for nothing (as
# if absent) and answered 400 naming it otherwise, never silently ignored. Fields OpenAI does not define (and
# vLLM extensions ringllm lacks, e.g. min_tokens) are refused by msgspec as unknown fields. `user`,
# `safety_identifier` and `prompt_cache_key` are accepted: they identify or hint and change no output (the
# prefix cache is automatic).
NOT_IMPLEMENTED: dict[str, tuple] = {
    "suffix": (None, ""),  # completions: text after the insertion point
    "best_of": (None, 1),  # completions: server-side candidates
    "service_tier": (None, "auto", "default"),  # there is one tier
    "store": (None, False),
    "metadata": (None,),  # stored completions
    "prediction": (None,),  # predicted outputs
    "audio": (None,),
    "modalities": (None, ["text"]),
    "reasoning_effort": (None,),
    "verbosity": (None,),
    "web_search_options": (None,),
    "include_obfuscation": (None, False),  # stream_options
    # vLLM's: beam search is not served (length_penalty only weighs beams), nor are these later extensions
    "use_beam_search": (None, False),
    "length_penalty": (None, 1.0),
    "watermarking": (None, False),
    "logprob_token_ids": (None,),
    "repetition_detection": (None,),
    "thinking_token_budget": (None, -1),
}


# response_format (OpenAI): plain text, any JSON object, or JSON matching a schema. The engine enforces the
# schema whether `strict` is true or not.
class TextFormat(msgspec.Struct, tag="text", tag_field="type", forbid_unknown_fields=True):
    """Free text: no constraint."""


class JsonObjectFormat(msgspec.Struct, tag="json_object", tag_field="type", forbid_unknown_fields=True):
    """Any JSON object."""


class JsonSchemaSpec(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str = "response"
    description: str | None = None
    schema: dict | bool
    strict: bool | None = None


class JsonSchemaFormat(msgspec.Struct, tag="json_schema", tag_field="type", forbid_unknown_fields=True):
    json_schema: JsonSchemaSpec


ResponseFormat = TextFormat | JsonObjectFormat | JsonSchemaFormat
# vLLM's older names for structured_outputs' kinds
GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def _constraint(body) -> StructuredOutputs | None:
    """The one output constraint of a body: `structured_outputs` (vLLM), `response_format` (OpenAI) or a
    `guided_*` field (vLLM's older names). A JSON schema must be a valid one (checked against the JSON Schema
    meta-schema here; the engine compiles it)."""
    given = {}
    if body.structured_outputs is not None:
        given["structured_outputs"] = body.structured_outputs
    if isinstance(body.response_format, JsonObjectFormat):
        given["response_format"] = StructuredOutputs(json_object=True)
    elif isinstance(body.response_format, JsonSchemaFormat):
        schema = body.response_format.json_schema.schema
        # A boolean schema (JsonSchemaSpec allows one) is refused here, by StructuredOutputs' declared types.
        given["response_format"] = StructuredOutputs(json=schema)  # type: ignore[arg-type]
    for name, kind in GUIDED.items():
        if getattr(body, name) is not None:
            try:
                given[name] = StructuredOutputs(**{kind: getattr(body, name)})
            except ValueError as e:
                raise FieldError(name, f"{name}: {e}") from None
    if len(given) > 1:
        first = next(iter(given))
        raise FieldError(first, f"{first}: give one output constraint, not {' and '.join(given)}")
    if not given:
        return None
    [(name, constraint)] = given.items()
    if constraint.json is not None:
        import jsonschema_rs

        try:
            jsonschema_rs.meta.validate(msgspec.json.decode(constraint.json))
        except jsonschema_rs.ValidationError as e:
            raise FieldError(name, f"{name}: not a valid JSON schema: {str(e).splitlines()[0]}") from None
    return constraint


def _refuse_unimplemented(obj) -> None:
    for name in type(obj).__struct_fields__:
        allowed = NOT_IMPLEMENTED.get(name)
        if allowed is not None and getattr(obj, name) not in allowed:
            raise FieldError(
                name,
                f"{name} is not supported by this server (accepted only as "
                f"{' or '.join(msgspec.json.encode(v).decode() for v in allowed)})",
            )


class _Sampling(SamplingFields, kw_only=True, forbid_unknown_fields=True):
    """What both endpoints take: the engine's sampling fields as declared in ipc/sampling.py (inherited, with
    their bounds), plus the OpenAI fields below, which `sampling_params` maps onto the engine's. A field
    neither declares is refused with 400 naming it."""

    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    n: Annotated[int, Meta(ge=1, le=MAX_N)] = 1
    stop: Text | Annotated[list[Text], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    safety_identifier: str | None = None
    prompt_cache_key: str | None = None
    service_tier: Any = None
    response_format: ResponseFormat | None = None
    guided_json: str | dict | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    use_beam_search: Any = None
    length_penalty: Any = None
    watermarking: Any = None
    logprob_token_ids: Any = None
    repetition_detection: Any = None
    thinking_token_budget: Any = None

    def sampling_params(self, **engine_fields) -> SamplingParams:
        """The engine's parameters for this body: every shared field as it is, `stop` as a list, the output
        constraint of response_format / guided_* / structured_outputs, and `engine_fields` (max_tokens once it
        is checked against the context, logprobs as the engine counts them). Raises FieldError naming the bad
        field."""
        self._refuse()
        shared = {name: getattr(self, name) for name in SamplingFields.__struct_fields__}
        shared["structured_outputs"] = _constraint(self)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(**shared, stop=stop, **engine_fields)

    def _refuse(self) -> None:
        _refuse_unimplemented(self)
        if self.stream_options is not None:
            _refuse_unimplemented(self.stream_options)
        if self.stream and self.prompt_logprobs is not None:  # as vLLM: a stream's chunks have no place for them
            raise FieldError("prompt_logprobs", "prompt_logprobs are not available when stream is true")


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str | TokenId | list[TokenId]]  # a string, strings, token ids, or lists of token ids
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None  # the chosen token's logprob and the top k
    echo: bool = False  # the prompt comes back before the completion (with its tokens' logprobs, if asked)
    suffix: Any = None
    best_of: Any = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: bool = True
    chat_template_kwargs: dict | None = None  # extra variables for the chat template, e.g. enable_thinking
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    logprobs: bool = False
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None
    store: Any = None
    metadata: Any = None
    prediction: Any = None
    audio: Any = None
    modalities: Any = None
    reasoning_effort: Any = None
    verbosity: Any = None
    web_search_options: Any = None

    def _refuse(self) -> None:
        super()._refuse()
        if self.top_logprobs is not None and not self.logprobs:
            raise FieldError("top_logprobs", "top_logprobs needs logprobs: true")


class TokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """vLLM's /tokenize body (its completion and chat forms in one; null is unset). app/tokenization.py refuses
    the chat options beside a prompt."""

    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None  # as in a chat request; rendered with the chat template
    add_special_tokens: bool | None = None  # default: True for a prompt (as completions), False for messages
    return_token_strs: bool | None = None  # the tokens' strings too, as `token_strs`
    add_generation_prompt: bool | None = None  # messages: open the assistant's turn (default true)
    continue_final_message: bool | None = None  # messages: leave the last (assistant) turn open to continue it
    tools: list[Tool] | None = None  # messages: the tools the template shows
    chat_template_kwargs: dict | None = None  # messages: extra template variables, as on the chat route


class DetokenizeRequest(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str | None = None
    tokens: list[int]


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
