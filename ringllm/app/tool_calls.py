"""Tool calls in the model's text, parsed into OpenAI `tool_calls`. Incremental like app/reasoning.py: fed the
answer text piece by piece, a parser returns the plain text that is certain and each call once its text is
complete, so that a stream and a whole answer give the same result wherever the pieces were cut. A call whose
text is not a valid call (bad JSON, no name) is left in the answer as text.

Two syntaxes, named as vLLM's `--tool-call-parser` names them:
- `hermes` (Qwen2.5, Qwen3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, one block per call,
  text allowed around them. Small Qwen models also write the same JSON in a fenced block (```json ... ```) or
  bare, as the whole answer: with the request's tools known, both count as calls when they name those tools.
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
FENCE = "```"
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
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply to decode
            return None
    if not isinstance(args, dict):
        return None
    return ToolCall(obj["name"], json.dumps(args, ensure_ascii=False))


class HermesParser:
    """Feed answer text; each call returns (text, calls) made certain by it. Blank text right before a call,
    between calls and after the last one is dropped (it only separates the blocks).

    Small Qwen models (Qwen2.5-Coder-0.5B) often write the call's JSON without the tags: an answer that is
    nothing but such JSON is held to the end and counts as calls, and so does a fenced block (```json ...```,
    8 of 10 calls of that model on the test suite's requests) anywhere in the answer, when it holds nothing
    but calls. Both need the request's tool names (`tool_names`), and a call, tagged or not, that names a tool
    the request did not offer stays text."""

    def __init__(self, tool_names=()):
        self.buf = ""
        self.block: str | None = None  # the closing marker of the block being read (tag or fence), if any
        self.called = False
        self.names = set(tool_names)
        self.mode = "start" if self.names else "tags"  # "start" (only blanks so far), "bare" or "tags"

    def feed(self, text: str) -> tuple[str, list[ToolCall]]:
        if self.mode == "start":
            self.buf += text
            head = self.buf.lstrip()
            if not head:
                return "", []
            self.mode = "bare" if head.startswith(("{", "[")) else "tags"
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

    def _markers(self) -> tuple[str, ...]:
        return (HERMES_START, FENCE) if self.names else (HERMES_START,)

    def _tags(self, text: str) -> tuple[str, list[ToolCall]]:
        self.buf += text
        out, calls = [], []
        while True:
            if self.block is not None:
                body = self._block_body()
                if body is None:
                    break
                found = self._calls_in(body)
                if found:
                    calls += found
                    self.called = True
                else:
                    out.append(body)
                continue
            at, marker = min(((self.buf.find(m), m) for m in self._markers() if m in self.buf), default=(-1, ""))
            if at >= 0:
                before = self.buf[:at].rstrip()
                if before.strip():
                    out.append(before)
                self.buf, self.block = self.buf[at:], HERMES_END if marker == HERMES_START else FENCE
                continue
            keep = max(held_prefix(self.buf, m) for m in self._markers())
            certain = self.buf[: len(self.buf) - keep]
            blank_tail = len(certain) - len(certain.rstrip())
            if certain.strip():  # hold trailing blanks: they are dropped if a call comes next
                out.append(certain[: len(certain) - blank_tail])
                self.buf = self.buf[len(certain) - blank_tail :]
            break
        return "".join(out), calls

    def _block_body(self) -> str | None:
        """The whole block at the head of the buffer (opening marker to closing one, both included), taken out
        of the buffer; None while it is not closed yet."""
        opening = HERMES_START if self.block == HERMES_END else FENCE
        assert self.block is not None
        at = self.buf.find(self.block, len(opening))
        if at < 0:
            return None
        end = at + len(self.block)
        body, self.buf, self.block = self.buf[:end], self.buf[end:], None
        return body

    def _calls_in(self, block: str) -> list[ToolCall]:
        """The calls a whole block holds: one per `<tool_call>` block, any number in a fence; [] if it is text."""
        if block.startswith(HERMES_START):
            call = _parse_json(block[len(HERMES_START) : -len(HERMES_END)])
            return [call] if call is not None and (not self.names or call.name in self.names) else []
        inside = block[len(FENCE) : -len(FENCE)]
        first, newline, rest = inside.partition("\n")
        if not newline or first.strip().lower() not in ("", "json"):
            return []
        return _parse_json_sequence(rest.strip(), self.names)

    def _finish_tags(self) -> tuple[str, list[ToolCall]]:
        rest, self.buf = self.buf, ""
        if self.block == HERMES_END:  # an unclosed tag block at the end still counts if it holds a whole call
            self.block = None
            call = _parse_json(rest[len(HERMES_START) :])
            if call is not None and (not self.names or call.name in self.names):
                return "", [call]
            return rest, []
        self.block = None
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
    except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply to decode
        return None


def _parse_json_sequence(text: str, names=frozenset()) -> list[ToolCall]:
    """Calls from `{...}; {...}` or a JSON list of them; an empty list unless the whole text is calls (of
    `names`, if given)."""
    decoder, pos = json.JSONDecoder(), 0
    objects: list = []
    while True:
        while pos < len(text) and text[pos] in " \t\r\n;,":
            pos += 1
        if pos == len(text):
            break
        try:
            obj, pos = decoder.raw_decode(text, pos)
        except (ValueError, RecursionError):  # RecursionError: JSON nested too deeply to decode
            return []
        objects += obj if isinstance(obj, list) else [obj]
    calls = [call_from_json(obj) for obj in objects]
    if not calls or any(c is None or (names and c.name not in names) for c in calls):
        return []
    return [c for c in calls if c is not None]


def make_parser(kind: str, tool_names=()):
    """A parser for a request whose tools are named `tool_names`."""
    if kind == "hermes":
        return HermesParser(tool_names)
    if kind == "llama3_json":
        return Llama3JsonParser(tool_names)
    raise ValueError(f"unknown tool-call parser {kind!r}; choose one of {', '.join(PARSERS)}")
