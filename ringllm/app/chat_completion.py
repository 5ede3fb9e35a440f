"""/v1/chat/completions: messages and tools in (through the chat template, app/chat.py), each choice's text out
split into reasoning, content and tool calls, whole or as SSE frames, with logprobs and usage as OpenAI gives
them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from msgspec import UNSET

from ringllm.app import chat as chat_io
from ringllm.app.completion import prompt_logprobs, token_text, usage_of
from ringllm.app.errors import ApiError
from ringllm.app.requests import Generations, Job, TokenLogprobs
from ringllm.app.schemas import (
    ChatChoice,
    ChatChunk,
    ChatLogprobs,
    ChatMessageOut,
    ChatRequest,
    ChatResponse,
    ChatStreamChoice,
    TokenLogprob,
    TopLogprob,
)
from ringllm.app.served_model import ServedModel
from ringllm.app.sse import DONE, event
from ringllm.ipc import messages as m
from ringllm.ipc.sampling import StructuredOutputs


class ChatService:
    def __init__(self, model: ServedModel, generations: Generations, parsers: tuple[str | None, str | None]):
        """`parsers`: the model's tool-call and reasoning parsers (app/chat.py's model_parsers)."""
        self.model, self.generations = model, generations
        self.tool_parser, self.reasoning_parser = parsers

    async def create(
        self, body: ChatRequest, request_id: str, disconnected: Callable[[], Coroutine[Any, Any, None]]
    ) -> ChatResponse | AsyncIterator[bytes]:
        """The answer, or for `stream` its SSE frames (the caller wraps them in app/sse.py's sse_stream).
        `disconnected` returns when the client has gone (a whole answer is then abandoned)."""
        self.model.check_name(body.model)
        plan = chat_io.tool_plan(body, self.tool_parser)
        prompt = self.render(body, plan.template_tools)
        bound = body.truncate_prompt_tokens is None  # a conversation to truncate may be longer than the context
        ids = await self.model.tokenize(prompt, param="messages", encode=self.model.tokenizer.encode_chat, bound=bound)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        ids = self.model.truncated(body, ids, max_tokens, None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = self.model.sampling(body, [ids], max_tokens, None, logprobs, "messages")
        if plan.schema is not None:
            sampling = _constrained(sampling, plan.schema)
        jobs = self.generations.jobs([ids], sampling, body.n)
        parsers = [chat_io.AnswerParser(prompt, self.reasoning_parser, plan) for _ in jobs]
        answer = _ChatAnswer(f"chatcmpl-{request_id}", self.model, body.logprobs, len(ids))
        if body.stream:
            include_usage = self.model.force_include_usage or bool(
                body.stream_options and body.stream_options.include_usage
            )
            return self._events(jobs, parsers, answer, include_usage)
        choices = await self.generations.collect(jobs, disconnected)
        return ChatResponse(
            answer.rid,
            answer.created,
            answer.model,
            [
                ChatChoice(
                    i,
                    chat_io.whole_message(parsers[i], c.text),
                    chat_io.finish_reason(parsers[i], c.finish_reason),
                    answer.logprobs(c.logprobs),
                )
                for i, c in enumerate(choices)
            ],
            usage_of(answer.prompt_tokens, sum(c.tokens for c in choices)),
            prompt_logprobs=UNSET
            if body.prompt_logprobs is None
            else prompt_logprobs(answer.tokenizer, choices[0].prompt, body.prompt_logprobs),
        )

    def render(self, body: ChatRequest, tools: list[dict] | None) -> str:
        """The conversation as the model's chat template writes it (a template that rejects it is a 400)."""
        tok = self.model.tokenizer
        messages = chat_io.template_messages(body.messages, tok.template_text)
        variables = chat_io.template_kwargs(body)
        try:
            return tok.apply_chat_template(messages, tools, **variables)
        except Exception as e:  # no template, or one that rejects the conversation
            raise ApiError(400, f"chat template failed: {e}", param="messages") from None

    async def _events(
        self, jobs: list[Job], parsers: list[chat_io.AnswerParser], answer: _ChatAnswer, include_usage: bool
    ) -> AsyncIterator[bytes]:
        first = [ChatStreamChoice(i, ChatMessageOut(role="assistant", content=""), None) for i in range(len(jobs))]
        yield event(answer.chunk(first))
        counts = [0] * len(jobs)
        async for out in self.generations.stream(jobs):
            counts[out.choice] = out.tokens
            logprobs = answer.logprobs(out.logprobs)
            for choice in _stream_choices(out.choice, parsers[out.choice], out.text, out.finish_reason, logprobs):
                yield event(answer.chunk([choice]))
        if include_usage:
            yield event(answer.chunk([], usage_of(answer.prompt_tokens, sum(counts))))
        yield DONE


def _stream_choices(
    index: int, parser: chat_io.AnswerParser, piece: str, reason: str | None, logprobs: ChatLogprobs | None
) -> list[ChatStreamChoice]:
    """The stream choices of one piece of a choice: one per part the parser made certain (reasoning, content,
    tool-call fragments); the piece's logprobs ride on the first, its finish_reason on the last. A piece that
    made nothing certain (a tag still open) sends nothing unless it ends the choice or carries logprobs."""
    deltas = [d for d in (parser.feed(piece), parser.finish() if reason else None) if d]
    if not deltas and reason is None and logprobs is None:
        return []
    messages = [msg for d in deltas for msg in chat_io.delta_messages(d)] or [ChatMessageOut(content="")]
    reason = chat_io.finish_reason(parser, reason)
    last = len(messages) - 1
    return [
        ChatStreamChoice(index, msg, reason if k == last else None, logprobs if k == 0 else None)
        for k, msg in enumerate(messages)
    ]


class _ChatAnswer:
    """What every chunk of one answer shares: its id, creation time, model name, and how its logprobs are
    written."""

    def __init__(self, rid: str, model: ServedModel, want_logprobs: bool, prompt_tokens: int):
        self.rid, self.created, self.model = rid, int(time.time()), model.name
        self.tokenizer = model.tokenizer
        self.want_logprobs, self.prompt_tokens = want_logprobs, prompt_tokens

    def chunk(self, choices: list[ChatStreamChoice], usage=None) -> ChatChunk:
        return ChatChunk(self.rid, self.created, self.model, choices, usage)

    def logprobs(self, lps: list[TokenLogprobs]) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        tok = self.tokenizer

        def one(tid: int, lp, top) -> TokenLogprob:
            text = token_text(tok, tid)
            tops = [TopLogprob(token_text(tok, i), v, list(token_text(tok, i).encode())) for i, v in top]
            return TokenLogprob(text, lp, list(text.encode()), tops)

        return ChatLogprobs([one(*x) for x in lps])


def _constrained(sampling: m.Sampling, schema: dict) -> m.Sampling:
    """tool_choice "required" or a named function: the output must match `schema` (the structured-output
    machinery of ipc/sampling.py), so the call is valid JSON for the function's parameters."""
    if sampling.structured_outputs is not None:
        raise ApiError(
            400,
            "tool_choice 'required' or a named function cannot be combined with another output "
            "constraint (response_format, structured_outputs)",
            param="tool_choice",
        )
    # Compact JSON: a call needs no layout, and unbounded whitespace would let a model spend its tokens on it.
    constraint = StructuredOutputs(json=schema, disable_any_whitespace=True)
    return msgspec.structs.replace(sampling, structured_outputs=constraint)
