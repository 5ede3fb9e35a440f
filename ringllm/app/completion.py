"""/v1/completions: prompts (a string, strings, token ids or lists of them) in, choices out, whole or as SSE
frames, with logprobs, echo and usage as OpenAI gives them."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from msgspec import UNSET

from ringllm.app.errors import ApiError
from ringllm.app.requests import Generations, PromptTokenLogprobs, TokenLogprobs
from ringllm.app.schemas import (
    MAX_PROMPTS,
    CompletionChoice,
    CompletionLogprobs,
    CompletionRequest,
    CompletionResponse,
    PromptLogprob,
    PromptLogprobs,
    Usage,
)
from ringllm.app.served_model import ServedModel
from ringllm.app.sse import DONE, event
from ringllm.text.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions


class CompletionService:
    def __init__(self, model: ServedModel, generations: Generations):
        self.model, self.generations = model, generations

    async def create(
        self, body: CompletionRequest, request_id: str, disconnected: Callable[[], Coroutine[Any, Any, None]]
    ) -> CompletionResponse | AsyncIterator[bytes]:
        """The answer, or for `stream` its SSE frames (the caller wraps them in app/sse.py's sse_stream).
        `disconnected` returns when the client has gone (a whole answer is then abandoned)."""
        self.model.check_name(body.model)
        prompts = _prompt_list(body.prompt)
        # Text prompts get the tokenizer's special tokens (Llama's BOS) as in transformers and vLLM; ids are as given.
        # A prompt to truncate may be longer than the context: truncate_prompt_tokens cuts it to fit.
        bound = body.truncate_prompt_tokens is None
        ids_list = [
            await self.model.tokenize(p, add_special_tokens=True, bound=bound) if isinstance(p, str) else list(p)
            for p in prompts
        ]
        if not all(ids_list):
            raise ApiError(400, "the prompt is empty", param="prompt")
        whole = ids_list
        ids_list = [self.model.truncated(body, ids, body.max_tokens, DEFAULT_MAX_TOKENS) for ids in ids_list]
        sampling = self.model.sampling(body, ids_list, body.max_tokens, DEFAULT_MAX_TOKENS, body.logprobs, "prompt")
        echoes = None
        if body.echo:  # the prompt comes back before the completion, with its tokens' logprobs if asked for
            if body.logprobs is not None:  # as many top logprobs as the echo or prompt_logprobs asks, the more
                wanted = max(body.logprobs, body.prompt_logprobs or 0)
                sampling = msgspec.structs.replace(sampling, prompt_logprobs=wanted)
            tok = self.model.tokenizer
            echoes = [
                p if isinstance(p, str) and ids is all_ids else tok.decode(ids)  # a truncated prompt as it is now
                for p, ids, all_ids in zip(prompts, ids_list, whole)
            ]
        jobs = self.generations.jobs(ids_list, sampling, body.n, echoes)
        answer = _Answer(f"cmpl-{request_id}", self.model, body.logprobs is not None, sum(map(len, ids_list)))
        k = body.prompt_logprobs
        if body.stream:
            include_usage = self.model.force_include_usage or bool(
                body.stream_options and body.stream_options.include_usage
            )
            return self._events(jobs, answer, include_usage)
        choices = await self.generations.collect(jobs, disconnected)
        return answer.response(
            [
                CompletionChoice(
                    i,
                    c.text,
                    c.finish_reason,
                    answer.logprobs(c.logprobs),
                    UNSET if k is None else prompt_logprobs(answer.tokenizer, c.prompt, k),
                )
                for i, c in enumerate(choices)
            ],
            sum(c.tokens for c in choices),
        )

    async def _events(self, jobs, answer: _Answer, include_usage: bool) -> AsyncIterator[bytes]:
        counts = [0] * len(jobs)
        async for out in self.generations.stream(jobs):
            counts[out.choice] = out.tokens
            choice = CompletionChoice(out.choice, out.text, out.finish_reason, answer.logprobs(out.logprobs))
            yield event(answer.response([choice]))
        if include_usage:
            yield event(answer.response([], sum(counts)))
        yield DONE


class _Answer:
    """What every chunk of one answer shares: its id, creation time, model name, and how its logprobs and usage
    are written."""

    def __init__(self, rid: str, model: ServedModel, want_logprobs: bool, prompt_tokens: int):
        self.rid, self.created, self.model = rid, int(time.time()), model.name
        self.tokenizer = model.tokenizer
        self.want_logprobs, self.prompt_tokens = want_logprobs, prompt_tokens

    def response(self, choices: list[CompletionChoice], completion_tokens: int | None = None) -> CompletionResponse:
        usage = None if completion_tokens is None else usage_of(self.prompt_tokens, completion_tokens)
        return CompletionResponse(self.rid, self.created, self.model, choices, usage)

    def logprobs(self, lps: list[TokenLogprobs]) -> CompletionLogprobs | None:
        if not self.want_logprobs:
            return None
        tok = self.tokenizer
        # As OpenAI and vLLM: each token's top_logprobs hold the token itself besides the top k (k + 1 at most)
        return CompletionLogprobs(
            [token_text(tok, t) for t, _, _ in lps],
            [lp for _, lp, _ in lps],
            [
                None
                if top is None or lp is None
                else {token_text(tok, t): lp} | {token_text(tok, i): v for i, v in top}
                for t, lp, top in lps
            ],
        )


def usage_of(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens)


def prompt_logprobs(tokenizer: Tokenizer, prompt: list[PromptTokenLogprobs] | None, k: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: None for the first prompt token, then each prompt token's own logprob and rank
    and the top k there (-inf written as -9999, as vLLM does), keyed by token id."""
    out: PromptLogprobs = [None]
    for token, lp, rank, top in prompt or ():
        entry = {token: PromptLogprob(max(lp, -9999.0), rank, token_text(tokenizer, token))}
        for r, (i, v) in enumerate(top[:k], 1):
            entry.setdefault(i, PromptLogprob(max(v, -9999.0), r, token_text(tokenizer, i)))
        out.append(entry)
    return out


def token_text(tokenizer: Tokenizer, token_id: int) -> str:
    """One token as logprobs name it: its own text, special tokens included."""
    return tokenizer.decode([token_id], skip_special_tokens=False)


def _prompt_list(prompt) -> list:
    """The request's prompts: a string, a list of strings, a list of token ids, or a list of such lists."""
    if isinstance(prompt, str):
        return [prompt]
    kinds = {type(x) for x in prompt}
    if len(kinds) > 1:
        raise ApiError(
            400,
            "prompt must be a string, a list of strings, a list of token ids or a list of lists of token ids",
            param="prompt",
        )
    if not prompt or kinds == {int}:
        return [prompt]
    if len(prompt) > MAX_PROMPTS:
        raise ApiError(400, f"at most {MAX_PROMPTS} prompts per request", param="prompt")
    return list(prompt)
