"""Tool calls in the model's text, parsed into OpenAI `tool_calls`. Incremental like app/reasoning.py: fed the
answer text piece by piece, a parser returns the plain text that is certain and each call once its text is
complete, so that a stream and a whole answer give the same result wherever the pieces were cut. A call whose
text is not a valid call (bad JSON, no name) is left in the answer as text.

Two syntaxes, named as vLLM's `--tool-call-parser` names them:
- `hermes` (Qwen2.5, Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call,
  text allowed around them.
- `llama3_json` (Llama 3.1/3.2/3.3): the whole answer is `{"name": ..., "parameters": {...}}` (several
  separated by `;`), optionally after `<|python_tag|>`. An answer that does not start with `{` is text."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

from ringllm.app.reasoning import held_prefix

PARSERS = ("hermes", "llama3_json")
HERMES_START, HERMES_END = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"


@dataclass
class ToolCall:
    name: str
    arguments: str  # JSON text of an object, as OpenAI sends it
    id: str = ""

    def __post_init__(self):
        self.id = self.id or new_call_id()


def new_call_id() -> str:
    return f"call_{os.urandom(12).hex()}"


def call_from_json(obj, args_keys=("arguments", "parameters")) -> ToolCall | None:
    """A call from a decoded {"name": str, "arguments": object} (or "parameters"), else None."""
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str) or not obj["name"]:
        return None
    args: Any = next((obj[k] for k in args_keys if k in obj), {})
    if isinstance(args, str):  # some models write the arguments as a JSON string
        try:
            args = json.loads(args)
        except ValueError:
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser:
    """Feed answer text; each call returns (text, calls) made certain by it. Blank text right before a call,
    between calls and after the last one is dropped (it only separates the blocks).

    Small Qwen models (Qwen2.5-Coder-0.5B) often write the call's JSON without the tags: an answer that is
    nothing but such JSON, naming one of the request's tools, is held to the end and counts as calls too."""

    def __init__(self, tool_names=()):
        self.buf = ""
        self.in_call = False
        self.called = False
        self.names = set(tool_names)
        self.mode = "start" if self.names else "tags"  # "start" (only blanks so far), "bare" or "tags"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "start":
            self.buf += text
            head = self.buf.lstrip()
            if not head:
                return "", []
            self.mode = "bare" if head.startswith("{") else "tags"
            text, self.buf = self.buf, ""
        if self.mode == "bare":
            self.buf += text
            return "", []
        return self._tags(text)

    def finish(self) -> tuple[str, list[ToolCall]]:
        if self.mode == "bare":
            calls = _parse_json_sequence(self.buf.strip(), self.names)
            if calls:
                self.buf = ""
                return "", calls
            self.mode, text, self.buf = "tags", self.buf, ""  # not calls: parse it as any other answer
            out, calls = self._tags(text)
            rest, more = self._finish_tags()
            return out + rest, calls + more
        return self._finish_tags()

    def _tags(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        out, calls = [], []
        while True:
            if self.in_call:
                at = self.buf.find(HERMES_END)
                if at < 0:
                    break
                body, self.buf = self.buf[:at], self.buf[at + len(HERMES_END) :]
                self.in_call = False
                call = _parse_json(body)
                if call is None:
                    out.append(HERMES_START + body + HERMES_END)
                else:
                    calls.append(call)
                    self.called = True
                continue
            at = self.buf.find(HERMES_START)
            if at >= 0:
                before = self.buf[:at].rstrip()
                if before.strip():
                    out.append(before)
                self.buf, self.in_call = self.buf[at + len(HERMES_START) :], True
                continue
            keep = held_prefix(self.buf, HERMES_START)
            certain = self.buf[: len(self.buf) - keep]
            blank_tail = len(certain) - len(certain.rstrip())
            if certain.strip():  # hold trailing blanks: they are dropped if a call comes next
                out.append(certain[: len(certain) - blank_tail])
                self.buf = self.buf[len(certain) - blank_tail :]
            break
        return "".join(out), calls

    def _finish_tags(self) -> tuple[str, list[ToolCall]]:
        rest, self.buf = self.buf, ""
        if self.in_call:  # an unclosed block at the end still counts if it holds a whole call
            call = _parse_json(rest)
            return ("", [call]) if call else (HERMES_START + rest, [])
        return ("" if self.called and not rest.strip() else rest), []


class Llama3JsonParser:
    """The answer is either tool calls as JSON from its first character on (naming the request's tools, when
    they are given), or text."""

    def __init__(self, tool_names=()):
        self.buf = ""
        self.names = set(tool_names)
        self.mode = "start"  # "start" (only blanks so far), "json" (held to the end) or "text"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "text":
            return text, []
        self.buf += text
        head = self.buf.lstrip()
        if not head or PYTHON_TAG.startswith(head):
            return "", []
        if head.startswith(("{", PYTHON_TAG)):
            self.mode = "json"
            return "", []
        self.mode, out, self.buf = "text", self.buf, ""
        return out, []

    def finish(self) -> tuple[str, list[ToolCall]]:
        rest, self.buf = self.buf, ""
        if self.mode != "json":
            return rest, []
        calls = _parse_json_sequence(rest.strip().removeprefix(PYTHON_TAG), self.names)
        return ("", calls) if calls else (rest, [])


def _parse_json(text: str) -> ToolCall | None:
    try:
        return call_from_json(json.loads(text))
    except ValueError:
        return None


def _parse_json_sequence(text: str, names=frozenset()) -> list[ToolCall]:
    """Calls from `{...}; {...}`; an empty list unless the whole text is calls (of `names`, if given)."""
    decoder, pos = json.JSONDecoder(), 0
    calls: list[ToolCall] = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;":
            pos += 1
        if pos == len(text):
            return calls
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except ValueError:
            return []
        call = call_from_json(obj)
        if call is None or (names and call.name not in names):
            return []
        calls.append(call)


def make_parser(kind: str, tool_names=()):
    """A parser for a request whose tools are named `tool_names`."""
    if kind == "hermes":
        return HermesParser(tool_names)
    if kind == "llama3_json":
        return Llama3JsonParser(tool_names)
    raise ValueError(f"unknown tool-call parser {kind!r}; choose one of {', '.join(PARSERS)}")
