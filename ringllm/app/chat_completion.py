"""/v1/chat/completions: messages and tools in (through the chat template, app/chat.py), each choice's text out
split into reasoning, content and tool calls, whole or as SSE frames, with logprobs and usage as OpenAI gives
them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

from ringllm.app import chat as chat_io
from ringllm.app.completion import TokenNames, check_prompt_logprob_work, prompt_logprobs, usage_of
from ringllm.app.errors import ApiError
from ringllm.app.requests import Generations, Job, TokenLogprobs
from ringllm.app.responses import (
    ChatChoice,
    ChatChunk,
    ChatLogprobs,
    ChatMessage,
    ChatMessageOut,
    ChatResponse,
    ChatStreamChoice,
    TokenLogprob,
    TopLogprob,
    Usage,
)
from ringllm.app.schemas import ChatRequest
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
        self,
        body: ChatRequest,
        request_id: str,
        disconnected: Callable[[], Coroutine[Any, Any, None]],
        extras: list[dict] | None = None,
    ) -> ChatResponse | AsyncIterator[bytes]:
        """The answer, or for `stream` its SSE frames (the caller wraps them in app/sse.py's sse_stream).
        `disconnected` returns when the client has gone (a whole answer is then abandoned); `extras`: the
        messages' undeclared keys (chat.py's message_extras), for the template."""
        self.model.check_name(body.model)
        self.model.require_tokenizer("messages", "a chat (its template writes text)")
        plan = chat_io.tool_plan(body, self.tool_parser)
        messages = chat_io.template_messages(body.messages, self.model.tokenizer.template_text, extras)
        prompt = self.render(body, messages, plan.template_tools)
        bound = body.truncate_prompt_tokens is None  # a conversation to truncate may be longer than the context
        ids = await self.model.tokenize(prompt, param="messages", encode=self.model.tokenizer.encode_chat, bound=bound)
        max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
        ids = self.model.truncated(body, ids, max_tokens, None)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        sampling = self.model.sampling(body, [ids], max_tokens, None, logprobs, "messages")
        if plan.schema is not None:
            sampling = _constrained(sampling, plan.schema)
        check_prompt_logprob_work([ids], body.n, sampling.prompt_logprobs, "prompt_logprobs")
        jobs = self.generations.jobs([ids], sampling, body.n)
        parsers = [chat_io.AnswerParser(prompt, self.reasoning_parser, plan) for _ in jobs]
        answer = _ChatAnswer(f"chatcmpl-{request_id}", self.model, body, ids, plan.forced is not None)
        answer.echo = chat_io.echoed(body, messages)
        if body.stream:
            final, continuous = body.stream_options.usage_in() if body.stream_options is not None else (False, False)
            # --enable-force-include-usage: a final usage chunk whatever the request asked
            return self._events(jobs, parsers, answer, final or self.model.force_include_usage, continuous)
        choices = await self.generations.collect(jobs, disconnected)
        answer.cached = choices[0].cached_tokens
        want_ids = body.return_token_ids
        return ChatResponse(
            answer.rid,
            answer.created,
            answer.model,
            [
                ChatChoice(
                    i,
                    answer.whole_message(parsers[i], c.text),
                    chat_io.finish_reason(parsers[i], c.finish_reason),
                    answer.logprobs(c.logprobs),
                    c.token_ids if want_ids else None,
                )
                for i, c in enumerate(choices)
            ],
            answer.usage(sum(c.tokens for c in choices)),
            prompt_logprobs=None
            if body.prompt_logprobs is None
            else prompt_logprobs(answer.tokenizer, choices[0].prompt, body.prompt_logprobs),
            prompt_token_ids=ids if want_ids else None,
        )

    def render(self, body: ChatRequest, messages: list[dict], tools: list[dict] | None) -> str:
        """The conversation (`messages`: as the template takes them) as the model's chat template writes it (a
        template that rejects it is a 400)."""
        variables = chat_io.template_kwargs(body)
        try:
            return self.model.tokenizer.apply_chat_template(messages, tools, **variables)
        except Exception as e:  # no template, or one that rejects the conversation
            raise ApiError(400, f"chat template failed: {e}", param="messages") from None

    async def _events(
        self,
        jobs: list[Job],
        parsers: list[chat_io.AnswerParser],
        answer: _ChatAnswer,
        final_usage: bool,
        every_usage: bool,
    ) -> AsyncIterator[bytes]:
        """SSE frames: the role chunk, one per part of each piece of a choice (with `every_usage`, each with the
        usage of that choice so far, as vLLM's continuous_usage_stats), then with `final_usage` one with the
        whole usage and no choices. With return_token_ids the first frame carries the prompt's ids, and the
        first frame of each piece the piece's ids."""

        def usage(tokens: int):
            return answer.usage(tokens) if every_usage else None

        for i in range(len(jobs)):  # each choice opens with its role, as vLLM streams them
            opening = ChatStreamChoice(i, ChatMessageOut(role=answer.role, content=""), None)
            prompt_ids = jobs[0].ids if answer.want_token_ids and i == 0 else UNSET
            yield event(answer.chunk([opening], usage(0), prompt_ids=prompt_ids))
        for i in range(len(jobs) if answer.echo else 0):  # then the echoed message
            yield event(answer.chunk([ChatStreamChoice(i, ChatMessageOut(content=answer.echo), None)], usage(0)))
        counts = [0] * len(jobs)
        async for out in self.generations.stream(jobs):
            counts[out.choice] = out.tokens
            answer.cached = max(answer.cached, out.cached_tokens)
            logprobs = answer.logprobs(out.logprobs)
            ids = out.token_ids if answer.want_token_ids else None
            pieces = _stream_choices(out.choice, parsers[out.choice], out.text, out.finish_reason, logprobs, ids)
            for choice in pieces:
                yield event(answer.chunk([choice], usage(out.tokens)))
        if final_usage:
            yield event(answer.chunk([], answer.usage(sum(counts))))
        yield DONE


def _stream_choices(
    index: int,
    parser: chat_io.AnswerParser,
    piece: str,
    reason: str | None,
    logprobs: ChatLogprobs | None,
    token_ids: list[int] | None = None,
) -> list[ChatStreamChoice]:
    """The stream choices of one piece of a choice: one per part the parser made certain (reasoning, content,
    tool-call fragments); the piece's logprobs and token ids (return_token_ids) ride on the first, its
    finish_reason on the last. A piece that made nothing certain (a tag still open) sends nothing unless it
    ends the choice or carries logprobs or token ids."""
    deltas = [d for d in (parser.feed(piece), parser.finish() if reason else None) if d]
    if not deltas and reason is None and logprobs is None and not token_ids:
        return []
    messages = [msg for d in deltas for msg in chat_io.delta_messages(d)] or [ChatMessageOut(content="")]
    reason = chat_io.finish_reason(parser, reason)
    last = len(messages) - 1
    ids: list[int] | UnsetType = UNSET if token_ids is None else token_ids
    rest: list[int] | UnsetType = UNSET if token_ids is None else []
    return [
        ChatStreamChoice(
            index, msg, reason if k == last else None, logprobs if k == 0 else None, ids if k == 0 else rest
        )
        for k, msg in enumerate(messages)
    ]


class _ChatAnswer:
    """What every chunk of one answer shares: its id, creation time, model name, how its logprobs name tokens
    and how its usage is counted."""

    def __init__(self, rid: str, model: ServedModel, body: ChatRequest, prompt: list[int], forced_call: bool):
        """`forced_call`: tool_choice "required" or a named function (the answer is the call)."""
        self.rid, self.created, self.model = rid, int(time.time()), model.name
        self.tokenizer = model.tokenizer
        self.names = TokenNames(model, body.return_tokens_as_token_ids)
        self.want_logprobs, self.want_token_ids = body.logprobs, body.return_token_ids
        self.prompt_tokens = len(prompt)
        self.cached = 0  # prompt tokens the prefix cache served
        self.cached_of = model.cached_report
        self.role = chat_io.answer_role(body)
        self.echo: str | None = None  # the text echo puts first (chat.py's echoed)
        self.forced_call = forced_call

    def whole_message(self, parser: chat_io.AnswerParser, text: str) -> ChatMessage:
        message = chat_io.whole_message(parser, text)
        message.role = self.role
        if self.echo is not None:
            message.content = self.echo + (message.content or "")
        elif self.forced_call and message.content is None:
            message.content = ""  # vLLM's answer to a forced call: empty content beside the call, not null
        return ChatMessage.of(message)

    def usage(self, completion_tokens: int) -> Usage:
        return usage_of(self.prompt_tokens, completion_tokens, self.cached_of(self.cached))

    def chunk(
        self, choices: list[ChatStreamChoice], usage=None, prompt_ids: list[int] | UnsetType = UNSET
    ) -> ChatChunk:
        return ChatChunk(self.rid, self.created, self.model, choices, usage, prompt_token_ids=prompt_ids)

    def logprobs(self, lps: list[TokenLogprobs]) -> ChatLogprobs | None:
        if not self.want_logprobs:
            return None
        name = self.names.name

        def one(tid: int, lp, top) -> TokenLogprob:
            text = name(tid)
            tops = [TopLogprob(name(i), v, list(name(i).encode())) for i, v in top]
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
