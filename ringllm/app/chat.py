"""The chat route's own work on both sides of the engine.

In: the request's messages (text parts, tool calls and tool results) and tools become the variables of the
model's chat template, as transformers' apply_chat_template takes them; `tool_choice` decides whether tools
are shown, parsed, or forced by a JSON-schema constraint (as vLLM does: "required" asks for a JSON list of
calls, a named function for its arguments object).

Out: one choice's text, as it streams, is split into reasoning (app/reasoning.py), answer text and tool calls
(app/tool_calls.py), then formatted as OpenAI's message or its stream deltas. A whole answer is the same
pieces fed at once, so both give the same result."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from ringllm.app.errors import ApiError
from ringllm.app.reasoning import PARSERS as REASONING_PARSERS
from ringllm.app.reasoning import ReasoningParser, prompt_opens_reasoning
from ringllm.app.responses import ChatMessageOut, FunctionOut, ToolCallOut
from ringllm.app.schemas import ChatRequest, Message
from ringllm.app.tool_calls import PARSERS as TOOL_PARSERS
from ringllm.app.tool_calls import ToolCall, call_from_json, make_parser, new_call_id

# Variables the route sets itself; chat_template_kwargs may not replace them.
RESERVED_TEMPLATE_VARIABLES = {
    "messages",
    "tools",
    "documents",
    "add_generation_prompt",
    "continue_final_message",
    "bos_token",
    "eos_token",
}
FAMILY_PARSERS = {"qwen2": ("hermes", None), "qwen3": ("hermes", "qwen3"), "llama": ("llama3_json", None)}


# ---- which parsers a model uses ----
def default_parsers(model_path: str, template: str | None) -> tuple[str | None, str | None]:
    """(tool-call parser, reasoning parser) for a model: by its family (config.json's model_type), else by
    what its chat template writes (a GGUF file has no config.json)."""
    config = Path(model_path) / "config.json"
    if config.is_file():
        family = json.loads(config.read_text()).get("model_type")
        if family in FAMILY_PARSERS:
            return FAMILY_PARSERS[family]
    template = template or ""
    tool = "hermes" if "<tool_call>" in template else "llama3_json" if "<|python_tag|>" in template else None
    return tool, "qwen3" if "<think>" in template else None


def model_parsers(
    model_path: str, template: str | None, tool_flag: str | None, reasoning_flag: str | None
) -> tuple[str | None, str | None]:
    """The parsers the chat route uses: --tool-call-parser / --reasoning-parser, else the model's."""
    tool, thinking = default_parsers(model_path, template)
    return (
        parser_setting(tool_flag, tool, TOOL_PARSERS, "--tool-call-parser"),
        parser_setting(reasoning_flag, thinking, REASONING_PARSERS, "--reasoning-parser"),
    )


def parser_setting(value: str | None, default: str | None, choices: tuple[str, ...], flag: str) -> str | None:
    """A --tool-call-parser / --reasoning-parser value: unset means the model's default, 'none' means none."""
    if not value:
        return default
    if value == "none":
        return None
    if value not in choices:
        raise ValueError(f"{flag} {value!r}: choose one of {', '.join(choices)} or none")
    return value


# ---- in: messages and tools as the template takes them ----
class _RawMessages(msgspec.Struct):
    messages: list[dict[str, msgspec.Raw]] | None = None  # values undecoded: only undeclared keys' are wanted


_MESSAGE_FIELDS = frozenset(Message.__struct_fields__)


def message_extras(body: bytes) -> list[dict] | None:
    """Each message's keys that Message does not declare, from the raw body (msgspec drops them while decoding
    the request): the template gets them beside the declared ones. None when no message has any. `body` has
    been decoded as a request already, so its messages are a list of objects."""
    raw = msgspec.json.decode(body, type=_RawMessages).messages or []
    extras = [{k: msgspec.json.decode(v) for k, v in m.items() if k not in _MESSAGE_FIELDS} for m in raw]
    return extras if any(extras) else None


def template_messages(
    messages: list[Message], template: str | None = None, extras: list[dict] | None = None
) -> list[dict]:
    """The messages as the template takes them, each with its `extras` (message_extras). OpenAI's `developer`
    role is a system message; a template that does not know it (Qwen's and Llama's skip roles they do not name)
    gets it as `system`."""
    out = [{**(extras[i] if extras else {}), **_template_message(i, msg)} for i, msg in enumerate(messages)]
    if template is not None and "developer" not in template:
        for msg in out:
            if msg["role"] == "developer":
                msg["role"] = "system"
    return out


def _template_message(i: int, msg: Message) -> dict:
    where = f"messages[{i}]"
    if msg.tool_calls and msg.role != "assistant":
        raise ApiError(400, f"{where}: only assistant messages carry tool_calls", param=f"{where}.tool_calls")
    if msg.content is None and msg.refusal is None and not (msg.role == "assistant" and msg.tool_calls):
        raise ApiError(
            400,
            f"{where}: content is required (it may be null only in an assistant turn with tool_calls)",
            param=f"{where}.content",
        )
    if msg.role == "tool" and not msg.tool_call_id:
        raise ApiError(400, f"{where}: a tool message needs the tool_call_id it answers", param=f"{where}.tool_call_id")
    content = msg.refusal if msg.content is None and msg.refusal is not None else msg.content
    out: dict = {"role": msg.role, "content": _text(where, content)}
    if msg.name is not None:
        out["name"] = msg.name
    if msg.tool_calls:
        out["tool_calls"] = [_template_call(f"{where}.tool_calls[{j}]", call) for j, call in enumerate(msg.tool_calls)]
    if msg.tool_call_id is not None:
        out["tool_call_id"] = msg.tool_call_id
    if msg.reasoning_content is not None:
        out["reasoning_content"] = msg.reasoning_content
    return out


def _text(where: str, content) -> str | None:
    """A content string, or the text of its parts joined by newlines (as vLLM does for string templates)."""
    if content is None or isinstance(content, str):
        return content
    texts = []
    for j, part in enumerate(content):
        at = f"{where}.content[{j}]"
        if part.type != "text":
            raise ApiError(
                400, f"{at}: content parts of type {part.type!r} are not supported (only 'text')", param=f"{at}.type"
            )
        if part.text is None:
            raise ApiError(400, f"{at}: a text part needs 'text'", param=f"{at}.text")
        texts.append(part.text)
    return "\n".join(texts)


def _template_call(where: str, call) -> dict:
    """Arguments arrive as JSON text; templates (Qwen's, Llama's) write them with `| tojson`, so they get the
    decoded object, as vLLM gives them. Empty text is no arguments, `{}` (as vLLM takes it: clients send a call
    of a function without parameters back so)."""
    try:
        args = json.loads(call.function.arguments) if call.function.arguments else {}
    except (ValueError, RecursionError):  # RecursionError: nested too deeply to decode
        args = None
    if not isinstance(args, dict):
        raise ApiError(
            400, f"{where}.function.arguments must be the JSON text of an object", param=f"{where}.function.arguments"
        )
    out = {"type": "function", "function": {"name": call.function.name, "arguments": args}}
    return {"id": call.id, **out} if call.id is not None else out


def template_kwargs(data: ChatRequest) -> dict:
    """The template's variables besides messages and tools: chat_template_kwargs, the documents, and vLLM's
    add_generation_prompt (default: unless continue_final_message) and continue_final_message."""
    extra = dict(data.chat_template_kwargs or {})
    clash = sorted(RESERVED_TEMPLATE_VARIABLES & extra.keys())
    if clash:
        raise ApiError(400, f"chat_template_kwargs may not set {', '.join(clash)}", param="chat_template_kwargs")
    if data.continue_final_message and data.add_generation_prompt:  # vLLM's words
        raise ApiError(
            400,
            "Cannot set both `continue_final_message` and `add_generation_prompt` to True.",
            param="continue_final_message",
        )
    opens = not data.continue_final_message if data.add_generation_prompt is None else data.add_generation_prompt
    documents = {"documents": data.documents} if data.documents is not None else {}
    return extra | documents | {"add_generation_prompt": opens, "continue_final_message": data.continue_final_message}


def answer_role(data: ChatRequest) -> str:
    """The answer's role, as vLLM gives it: the assistant's when the template opens its turn, else the last
    message's (whose turn the model continues)."""
    opens = not data.continue_final_message if data.add_generation_prompt is None else data.add_generation_prompt
    return "assistant" if opens else data.messages[-1].role


def echoed(data: ChatRequest, messages: list[dict]) -> str | None:
    """vLLM's chat echo: the last message's text starts the answer when that message has the answer's role."""
    if not data.echo or messages[-1]["role"] != answer_role(data):
        return None
    return messages[-1]["content"] or ""


@dataclass
class ToolPlan:
    """What a request's tools and tool_choice mean for the template, the constraint and the parser."""

    template_tools: list[dict] | None = None  # shown to the model through the template's `tools`
    parser: str | None = None  # parse the model's own call syntax ("auto")
    schema: dict | None = None  # JSON-schema constraint on the whole output ("required", named)
    forced: str | None = None  # "required", or the named function's name
    one_call: bool = False  # parallel_tool_calls false
    names: tuple[str, ...] = ()  # the tools' names


def tool_plan(data: ChatRequest, tool_parser: str | None) -> ToolPlan:
    tools = data.tools or []
    choice = data.tool_choice if data.tool_choice is not None else ("auto" if tools else "none")
    if not tools:
        if choice != "none" and choice != "auto":
            raise ApiError(400, "tool_choice needs tools", param="tool_choice")
        return ToolPlan()
    if choice == "none":  # the model is told of no tools, so it answers in text
        return ToolPlan()
    names = [t.function.name for t in tools]
    if len(set(names)) != len(names):
        raise ApiError(400, "tool names must be unique", param="tools")
    shown = [{"type": "function", "function": msgspec.to_builtins(t.function)} for t in tools]
    one = not data.parallel_tool_calls
    if choice == "auto":
        if tool_parser is None:
            raise ApiError(
                400, "this model has no tool-call parser; start the server with --tool-call-parser", param="tools"
            )
        return ToolPlan(shown, tool_parser, one_call=one, names=tuple(names))
    if choice == "required":
        items = {"anyOf": [_call_schema(t) for t in tools]}
        schema = {"type": "array", "minItems": 1, "items": items, **({"maxItems": 1} if one else {})}
        if defs := _lifted_defs(tools):  # each tool's `#/$defs/...` refs now resolve at the wrapper's root
            schema["$defs"] = defs
        return ToolPlan(shown, schema=schema, forced="required", one_call=one)
    name = choice.function.name
    if name not in names:
        raise ApiError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
    return ToolPlan(shown, schema=_parameters(tools[names.index(name)]), forced=name, one_call=True)


def _parameters(tool) -> dict:
    return tool.function.parameters or {"type": "object", "properties": {}}


def _lifted_defs(tools) -> dict:
    """The tools' parameter `$defs`, gathered for the root of the required-calls schema (as vLLM does); two
    tools defining one name differently cannot share that root."""
    defs: dict = {}
    for tool in tools:
        for name, definition in (_parameters(tool).get("$defs") or {}).items():
            if defs.setdefault(name, definition) != definition:
                raise ApiError(
                    400,
                    f"tools define $defs/{name} differently; tool_choice required needs one definition per name",
                    param="tools",
                )
    return defs


def _call_schema(tool) -> dict:
    parameters = {k: v for k, v in _parameters(tool).items() if k != "$defs"}  # lifted to the root
    return {
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [tool.function.name]}, "parameters": parameters},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }


# ---- out: text -> reasoning, content, tool calls ----
@dataclass
class CallPart:
    """A piece of one tool call in a stream: the first carries id and name, the rest argument text."""

    index: int
    arguments: str
    id: str | None = None
    name: str | None = None


@dataclass
class Delta:
    reasoning: str = ""
    content: str = ""
    calls: list[CallPart] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.reasoning or self.content or self.calls)


class ForcedCalls:
    """Output constrained by ToolPlan.schema: a named function's arguments (streamed as they come) or, for
    "required", a JSON list of {"name", "parameters"} (its calls given once it is complete)."""

    def __init__(self, forced: str):
        self.name = None if forced == "required" else forced
        self.buf = ""
        self.started = False

    def feed(self, text: str) -> list[CallPart | ToolCall]:
        if self.name is None:
            self.buf += text
            return []
        if not self.started:
            self.started = True
            return [CallPart(0, text, new_call_id(), self.name)]
        return [CallPart(0, text)] if text else []

    def finish(self) -> tuple[str, list[CallPart | ToolCall]]:
        if self.name is not None:
            return "", self.feed("") if not self.started else []
        try:
            parsed = [call_from_json(x) for x in json.loads(self.buf)]
        except (ValueError, TypeError):
            parsed = [None]
        calls: list[CallPart | ToolCall] = [c for c in parsed if c is not None]
        if not calls or len(calls) < len(parsed):  # only when the output was cut short (max_tokens)
            return self.buf, []
        return "", calls


class AnswerParser:
    def __init__(self, prompt: str, reasoning_parser: str | None, plan: ToolPlan):
        on = reasoning_parser is not None and plan.forced is None  # forced output has no reasoning part
        self.reasoning = (
            ReasoningParser(reasoning_parser, prompt_opens_reasoning(prompt))
            if on and reasoning_parser is not None
            else None
        )
        self.forced = ForcedCalls(plan.forced) if plan.forced else None
        self.tools = make_parser(plan.parser, plan.names) if plan.parser else None
        self.one_call = plan.one_call
        self.named = plan.forced not in (None, "required")  # tool_choice named one function
        self.calls = 0  # calls begun so far; the next one gets this index

    @property
    def reasoned(self) -> bool:
        return self.reasoning is not None and self.reasoning.reasoned

    @property
    def called(self) -> bool:
        return self.calls > 0

    def feed(self, text: str) -> Delta:
        thought, answer = self.reasoning.feed(text) if self.reasoning else ("", text)
        return self._answer(thought, answer, final=False)

    def finish(self) -> Delta:
        thought, answer = self.reasoning.finish() if self.reasoning else ("", "")
        return self._answer(thought, answer, final=True)

    def _answer(self, thought: str, answer: str, final: bool) -> Delta:
        found: list[CallPart | ToolCall] = []
        if self.forced is not None:
            found = self.forced.feed(answer)
            answer = ""
            if final:
                answer, more = self.forced.finish()
                found += more
        elif self.tools is not None:
            answer, found = self.tools.feed(answer)
            if final:
                rest, more = self.tools.finish()
                answer, found = answer + rest, found + more
        return Delta(thought, answer, self._parts(found))

    def _parts(self, found: list[CallPart | ToolCall]) -> list[CallPart]:
        parts = []
        for item in found:
            if isinstance(item, CallPart):
                self.calls = max(self.calls, item.index + 1)
                parts.append(item)
            elif not (self.one_call and self.calls):  # parallel_tool_calls false: the first call only
                parts += [CallPart(self.calls, "", item.id, item.name), CallPart(self.calls, item.arguments)]
                self.calls += 1
        return parts


# ---- out: OpenAI shapes ----
def delta_messages(delta: Delta) -> list[ChatMessageOut]:
    """A stream's deltas for what the parser made certain: the text (reasoning and answer) in one, then each
    tool-call part in its own, as OpenAI streams them."""
    out = []
    if delta.content or delta.reasoning:
        out.append(ChatMessageOut(None, delta.content or None, delta.reasoning or None))
    for p in delta.calls:
        call = ToolCallOut(FunctionOut(p.name, p.arguments), p.id, "function" if p.id else None, p.index)
        out.append(ChatMessageOut(tool_calls=[call]))
    return out


def whole_message(parser: AnswerParser, text: str) -> ChatMessageOut:
    """A non-streaming answer: the whole text through the parser; the parts of each call joined."""
    first, last = parser.feed(text), parser.finish()
    content = first.content + last.content
    calls: dict[int, ToolCallOut] = {}
    for p in first.calls + last.calls:
        if p.index not in calls:
            calls[p.index] = ToolCallOut(FunctionOut(p.name, ""), p.id, "function")
        function = calls[p.index].function
        function.arguments = (function.arguments or "") + p.arguments
    reasoned = first.reasoning + last.reasoning if parser.reasoned else None
    return ChatMessageOut(
        "assistant", content if content or not (calls or reasoned) else None, reasoned, list(calls.values()) or None
    )


def finish_reason(parser: AnswerParser, reason: str | None) -> str | None:
    """A stop after calls is "tool_calls" for tool_choice auto and required; a named function's forced call ends
    with "stop", as OpenAI and vLLM say."""
    return "tool_calls" if reason == "stop" and parser.called and not parser.named else reason
