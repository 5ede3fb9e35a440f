"""Reasoning models: the text a model writes between `<think>` and `</think>` is its reasoning and comes back
as `reasoning_content`; what follows is the answer (`content`). The parser is incremental: it is fed the
streamed text piece by piece, wherever the pieces were cut, and gives the same split as parsing the whole
text at once. A tag cut across two pieces is held back until it is known to be (or not to be) a tag.

Two behaviours, named as vLLM's `--reasoning-parser` names them:
- `qwen3`: the model opens `<think>` itself (Qwen3's template leaves it to the model, or writes an empty
  `<think></think>` into the prompt when `enable_thinking` is false). Output that does not start with
  `<think>` is all answer.
- `deepseek_r1`: the template ends the prompt with `<think>`, so the model starts inside its reasoning; output
  up to `</think>` is reasoning even without an opening tag.
Either way, a prompt that ends inside an open `<think>` starts the parser in the reasoning."""

from __future__ import annotations

PARSERS = ("qwen3", "deepseek_r1")
START, END = "<think>", "</think>"


def held_prefix(text: str, tag: str) -> int:
    """Length of the longest tail of `text` that is a proper prefix of `tag` (it may become the tag)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def prompt_opens_reasoning(prompt: str) -> bool:
    """Whether the rendered prompt ends inside an open `<think>` (the model continues its reasoning)."""
    return prompt.rstrip().endswith(START)


class ReasoningParser:
    """Feed the model's text in pieces; each call returns (reasoning, content) made certain by that piece."""

    def __init__(self, kind: str, prompt_in_reasoning: bool = False):
        if kind not in PARSERS:
            raise ValueError(f"unknown reasoning parser {kind!r}; choose one of {', '.join(PARSERS)}")
        # "start": the output may still begin with <think>; "reasoning"; "after": the blank lines that
        # follow </think> are dropped (the chat template drops them too when it shows this turn again);
        # "content".
        self.state = "reasoning" if prompt_in_reasoning or kind == "deepseek_r1" else "start"
        self.optional_start = self.state == "reasoning"  # deepseek_r1 may still repeat the opening tag
        self.buf = ""
        self.reasoned = False

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        reasoning, content = [], []
        while True:
            if self.state == "start":
                head = self.buf.lstrip()
                if head.startswith(START):
                    self.buf, self.state = head[len(START) :], "reasoning"
                    self.reasoned = True
                    continue
                if START.startswith(head):  # still only blanks and part of the tag: wait
                    break
                self.state = "content"
                continue
            if self.state == "reasoning":
                self.reasoned = True
                if self.optional_start:
                    head = self.buf.lstrip()
                    if START.startswith(head) and len(head) < len(START):
                        break
                    self.optional_start = False
                    if head.startswith(START):
                        self.buf = head[len(START) :]
                at = self.buf.find(END)
                if at >= 0:
                    reasoning.append(self.buf[:at])
                    self.buf, self.state = self.buf[at + len(END) :], "after"
                    continue
                keep = held_prefix(self.buf, END)
                reasoning.append(self.buf[: len(self.buf) - keep])
                self.buf = self.buf[len(self.buf) - keep :]
                break
            if self.state == "after":
                self.buf = self.buf.lstrip("\n")
                if not self.buf:
                    break
                self.state = "content"
                continue
            content.append(self.buf)  # "content"
            self.buf = ""
            break
        return "".join(reasoning), "".join(content)

    def finish(self) -> tuple[str, str]:
        """What is still held at the end: a cut-off tag is plain text of the part it was in."""
        rest, self.buf = self.buf, ""
        if self.state == "reasoning":
            return rest, ""
        return "", "" if self.state == "after" else rest
