"""OpenAI request bodies as msgspec Structs: one definition validates, encodes and documents (the responses are in
app/responses.py). The bounds below are checked by msgspec as a body is decoded and appear in the OpenAPI document."""

from __future__ import annotations

import typing
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeVar

import msgspec
from msgspec import Meta

from ringllm.ipc.sampling import (
    MAX_LOGPROBS,
    MAX_STOP_SEQUENCES,
    FieldError,
    SamplingFields,
    SamplingParams,
    StructuredOutputs,
    Text,
    TokenId,
    truncate_prompt,
)

if TYPE_CHECKING:
    from ringllm.app.settings import SamplingDefaults

MAX_N = 16
MAX_PROMPTS = 64

# An optional field that takes an explicit null as well, meaning unset: OpenAI's schema allows null for every
# optional field and the official client sends it (`create(..., n=None)`), as vLLM accepts it. msgspec reads
# `T | None`; the body's __post_init__ (`_null_is_default`) puts the field's default in place of a null, so
# the code reads a T.
T = TypeVar("T")
if TYPE_CHECKING:
    Nullable = Annotated[T, "null: the default"]
else:

    class Nullable:
        def __class_getitem__(cls, item):
            return item | None


def _null_is_default(obj: msgspec.Struct) -> None:
    """Replaces each null by its field's default where that default is not null."""
    for f in msgspec.structs.fields(obj):
        if getattr(obj, f.name) is None:
            if f.default is not msgspec.NODEFAULT and f.default is not None:
                setattr(obj, f.name, f.default)
            elif f.default_factory is not msgspec.NODEFAULT:
                setattr(obj, f.name, f.default_factory())


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


class Message(msgspec.Struct, kw_only=True):
    """One turn. Keys besides these fields are not refused: they reach the chat template as they are (app/chat.py's
    message_extras), as transformers' apply_chat_template passes a message's keys, for templates that read keys
    of their own; vLLM accepts them too (and drops them)."""

    # Any role the client names, as vLLM takes it: the chat template decides what a role means (Qwen's and
    # Llama's write user/system/assistant/tool turns and skip others; a template may know roles of its own).
    role: Annotated[str, Meta(min_length=1)]
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
    include_usage: Nullable[bool] = False  # a last chunk with the usage and no choices
    # vLLM's: with include_usage, every chunk carries the usage so far too
    continuous_usage_stats: Nullable[bool] = False
    include_obfuscation: Any = None  # refused unless null or false (see NOT_IMPLEMENTED)

    def __post_init__(self) -> None:
        _null_is_default(self)

    def usage_in(self) -> tuple[bool, bool]:
        """(a final usage chunk, usage in every chunk)."""
        return self.include_usage, self.include_usage and self.continuous_usage_stats


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
    "prompt_embeds": (None, []),  # completions: embeddings in place of a prompt's tokens
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


def _nullable_fields(contract: type[msgspec.Struct]) -> list[tuple[str, Any, None]]:
    """The contract's fields, each as `its type | None` with null for its default: a body's unset field (absent
    or null) stays None, so that the model's defaults can fill it before the contract's own (sampling_params)."""
    hints = typing.get_type_hints(contract, include_extras=True)
    return [(name, hints[name] | None, None) for name in contract.__struct_fields__]


if TYPE_CHECKING:  # mypy reads the contract's fields (whose values may be None in a body)
    _BodySamplingFields = SamplingFields
else:
    _BodySamplingFields = msgspec.defstruct(
        "BodySamplingFields", _nullable_fields(SamplingFields), kw_only=True, omit_defaults=True, module=__name__
    )


class _Sampling(_BodySamplingFields, kw_only=True, forbid_unknown_fields=True):
    """What both endpoints take: the engine's sampling fields as declared in ipc/sampling.py (with their bounds,
    null or absent for unset), plus the OpenAI fields below, which `sampling_params` maps onto the engine's. A
    field neither declares is refused with 400 naming it."""

    model: str | None = None
    max_tokens: Annotated[int, Meta(ge=1)] | None = None
    n: Nullable[Annotated[int, Meta(ge=1, le=MAX_N)]] = 1
    stop: Text | Annotated[list[Text], Meta(max_length=MAX_STOP_SEQUENCES)] | None = None
    stream: Nullable[bool] = False
    stream_options: StreamOptions | None = None
    # vLLM's: the prompt's and each choice's token ids in the answer; logprobs naming tokens "token_id:<id>"
    return_token_ids: Nullable[bool] = False
    return_tokens_as_token_ids: bool | None = None  # None: the server's --return-tokens-as-token-ids
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

    def __post_init__(self) -> None:
        _null_is_default(self)

    def sampling_params(self, defaults: SamplingDefaults | None = None, **engine_fields) -> SamplingParams:
        """The engine's parameters for this body: every shared field it sets, else the model's default for it
        (`defaults`: generation_config.json's), else the contract's; `stop` as a list, the output constraint of
        response_format / guided_* / structured_outputs, and `engine_fields` (max_tokens once it is checked
        against the context, logprobs as the engine counts them). Raises FieldError naming the bad field."""
        self._refuse()
        model_defaults = msgspec.structs.asdict(defaults) if defaults is not None else {}
        shared = {}
        for name in SamplingFields.__struct_fields__:
            value = getattr(self, name)
            value = model_defaults.get(name) if value is None else value
            if value is not None:
                shared[name] = value
        shared["structured_outputs"] = _constraint(self)
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(**shared, stop=stop, **engine_fields)

    def _refuse(self) -> None:
        _refuse_unimplemented(self)
        if self.stream_options is not None:
            _refuse_unimplemented(self.stream_options)
            if not self.stream:  # as OpenAI and vLLM, whatever the options say
                raise FieldError("stream_options", "Stream options can only be defined when `stream=True`.")
        if self.stream and self.prompt_logprobs is not None:  # as vLLM: a stream's chunks have no place for them
            raise FieldError("prompt_logprobs", "prompt_logprobs are not available when stream is true")

    def truncated_prompt(self, ids: list[int], max_input: int) -> list[int]:
        """The prompt as truncate_prompt_tokens asks (ipc/sampling.py's truncate_prompt)."""
        return truncate_prompt(ids, self.truncate_prompt_tokens, self.truncation_side, max_input)


class CompletionRequest(_Sampling, kw_only=True):
    prompt: str | list[str | TokenId | list[TokenId]]  # a string, strings, token ids, or lists of token ids
    logprobs: Annotated[int, Meta(ge=0, le=MAX_LOGPROBS)] | None = None  # the chosen token's logprob and the top k
    echo: Nullable[bool] = False  # the prompt comes back before the completion (with its tokens' logprobs, if asked)
    suffix: Any = None
    best_of: Any = None
    prompt_embeds: Any = None


class ChatRequest(_Sampling, kw_only=True):
    messages: Annotated[list[Message], Meta(min_length=1)]
    tools: list[Tool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None  # default: auto with tools
    parallel_tool_calls: Nullable[bool] = True
    chat_template_kwargs: dict | None = None  # extra variables for the chat template, e.g. enable_thinking
    # vLLM's: open the assistant's turn (default: true unless continue_final_message), or leave the last
    # (assistant) message open for the model to continue; echo starts the answer with that message's text
    add_generation_prompt: bool | None = None
    continue_final_message: Nullable[bool] = False
    echo: Nullable[bool] = False
    documents: list[dict[str, str]] | None = None  # vLLM's: for templates that take documents (RAG)
    max_completion_tokens: Annotated[int, Meta(ge=1)] | None = None
    logprobs: Nullable[bool] = False
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
