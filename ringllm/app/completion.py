"""/v1/completions: prompts (a string, strings, token ids or lists of them) in, choices out, whole or as SSE
frames, with logprobs, echo and usage as OpenAI gives them."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import msgspec
from msgspec import UNSET

from ringllm.app.errors import ApiError
from ringllm.app.requests import Generations, Job, PromptTokenLogprobs, TokenLogprobs
from ringllm.app.responses import (
    CompletionChoice,
    CompletionChunk,
    CompletionLogprobs,
    CompletionResponse,
    CompletionStreamChoice,
    PromptLogprob,
    PromptLogprobs,
    PromptTokensDetails,
    Usage,
)
from ringllm.app.schemas import MAX_PROMPTS, CompletionRequest
from ringllm.app.served_model import ServedModel
from ringllm.app.sse import DONE, event
from ringllm.text.tokenizer import Tokenizer

DEFAULT_MAX_TOKENS = 16  # OpenAI's default for completions
# The most prompt-logprob entries (a prompt token's own logprob, or one of the top k beside it) one request may
# ask for, over every prompt and choice (each choice's prompt is scored and written out again). Each entry is tens
# of bytes of JSON and several times that of API-worker memory while the response is built, so without a bound
# echo + logprobs over many prompts and a large n made one request's answer hundreds of megabytes (issue 28).
# 2^19 is e.g. 64 prompts of 4,096 tokens with 1 top logprob, or one 8,192-token prompt with 20 and n = 3.
MAX_PROMPT_LOGPROB_ENTRIES = 1 << 19


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
            # vLLM's words, which its clients match; this server takes no prompt_embeds (schemas.py refuses them)
            raise ApiError(400, "Either prompt or prompt_embeds must be provided and non-empty.", param="prompt")
        whole = ids_list
        ids_list = [self.model.truncated(body, ids, body.max_tokens, DEFAULT_MAX_TOKENS) for ids in ids_list]
        sampling = self.model.sampling(body, ids_list, body.max_tokens, DEFAULT_MAX_TOKENS, body.logprobs, "prompt")
        echoes = None
        if body.echo:  # the prompt comes back before the completion, with its tokens' logprobs if asked for
            if body.logprobs is not None:  # as many top logprobs as the echo or prompt_logprobs asks, the more
                wanted = max(body.logprobs, body.prompt_logprobs or 0)
                sampling = msgspec.structs.replace(sampling, prompt_logprobs=wanted)
            tok = self.model.optional_tokenizer  # None: a server without one echoes no text (its prompts are ids)
            echoes = [
                p if isinstance(p, str) and ids is all_ids else tok.decode(ids) if tok is not None else ""
                for p, ids, all_ids in zip(prompts, ids_list, whole)  # a truncated prompt as it is now
            ]
        check_prompt_logprob_work(
            ids_list, body.n, sampling.prompt_logprobs, "prompt_logprobs" if not body.echo else "echo"
        )
        jobs = self.generations.jobs(ids_list, sampling, body.n, echoes)
        answer = _Answer(f"cmpl-{request_id}", self.model, body, jobs)
        if body.stream:
            final, continuous = body.stream_options.usage_in() if body.stream_options is not None else (False, False)
            # --enable-force-include-usage: a final usage chunk whatever the request asked
            return self._events(jobs, answer, final or self.model.force_include_usage, continuous)
        choices = await self.generations.collect(jobs, disconnected)
        k, want_ids = body.prompt_logprobs, body.return_token_ids
        for i, c in enumerate(choices):
            answer.cached[i] = c.cached_tokens
        return answer.response(
            [
                CompletionChoice(
                    i,
                    c.text,
                    c.finish_reason,
                    answer.logprobs(c.logprobs),
                    None if k is None else prompt_logprobs(answer.tokenizer, c.prompt, k),
                    job.ids if want_ids else None,
                    c.token_ids if want_ids else None,
                )
                for i, (c, job) in enumerate(zip(choices, jobs))
            ],
            sum(c.tokens for c in choices),
        )

    async def _events(
        self, jobs: list[Job], answer: _Answer, final_usage: bool, every_usage: bool
    ) -> AsyncIterator[bytes]:
        """SSE frames: one per piece of a choice (with `every_usage`, each with the usage of that choice so far, as
        vLLM's continuous_usage_stats), then with `final_usage` one with the whole usage and no choices. With
        return_token_ids a choice's first frame carries its prompt's ids, and each frame its piece's ids."""
        counts, sent = [0] * len(jobs), [0] * len(jobs)  # completion tokens and text sent, per choice
        started, want_ids = [False] * len(jobs), answer.want_token_ids
        async for out in self.generations.stream(jobs):
            i = out.choice
            first, started[i] = not started[i], True
            counts[i] = out.tokens
            answer.cached[i] = max(answer.cached[i], out.cached_tokens)
            choice = CompletionStreamChoice(
                i,
                out.text,
                out.finish_reason,
                answer.logprobs(out.logprobs, sent[i]),
                jobs[i].ids if want_ids and first else UNSET,
                out.token_ids if want_ids else UNSET,
            )
            sent[i] += len(out.text)
            usage = answer.usage(out.tokens, i) if every_usage else None
            yield event(CompletionChunk(answer.rid, answer.created, answer.model, [choice], usage))
        if final_usage:
            yield event(CompletionChunk(answer.rid, answer.created, answer.model, [], answer.usage(sum(counts))))
        yield DONE


class _Answer:
    """What every chunk of one answer shares: its id, creation time, model name, how its logprobs name tokens
    and how its usage is counted."""

    def __init__(self, rid: str, model: ServedModel, body: CompletionRequest, jobs: list[Job]):
        self.rid, self.created, self.model = rid, int(time.time()), model.name
        self.names = TokenNames(model, body.return_tokens_as_token_ids)
        self.tokenizer = model.optional_tokenizer
        self.want_logprobs, self.want_token_ids = body.logprobs is not None, body.return_token_ids
        self.prompts = [len(job.ids) for job in jobs[:: body.n]]  # each prompt counts once, whatever n
        self.n = body.n
        self.cached = [0] * len(jobs)  # per choice: its prompt tokens the prefix cache served
        self.cached_of = model.cached_report

    def usage(self, completion_tokens: int, choice: int | None = None) -> Usage:
        """The whole answer's usage, or with `choice` that choice's prompt and completion tokens so far."""
        if choice is not None:
            return usage_of(self.prompts[choice // self.n], completion_tokens, self.cached_of(self.cached[choice]))
        cached = sum(self.cached[:: self.n])
        return usage_of(sum(self.prompts), completion_tokens, self.cached_of(cached))

    def response(self, choices: list[CompletionChoice], completion_tokens: int) -> CompletionResponse:
        return CompletionResponse(self.rid, self.created, self.model, choices, self.usage(completion_tokens))

    def logprobs(self, lps: list[TokenLogprobs], sent: int = 0) -> CompletionLogprobs | None:
        """The logprobs of these tokens; their text_offset counts from `sent`, the text the choice sent before."""
        if not self.want_logprobs:
            return None
        name = self.names.name
        tokens = [name(t) for t, _, _ in lps]
        offsets = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=sent)) if tokens else []
        # As OpenAI and vLLM: each token's top_logprobs hold the token itself besides the top k (k + 1 at most)
        return CompletionLogprobs(
            tokens,
            [lp for _, lp, _ in lps],
            [None if top is None or lp is None else {name(t): lp} | {name(i): v for i, v in top} for t, lp, top in lps],
            offsets,
        )


class TokenNames:
    """How logprobs name a token: its own text (special tokens included), or with vLLM's
    return_tokens_as_token_ids (the request's, else the server's --return-tokens-as-token-ids) "token_id:<id>",
    which survives tokens that are not whole UTF-8."""

    def __init__(self, model: ServedModel, as_ids: bool | None):
        self.as_ids = model.return_tokens_as_token_ids if as_ids is None else as_ids
        self.tokenizer = model.optional_tokenizer

    def name(self, token_id: int) -> str:
        if self.as_ids:
            return f"token_id:{token_id}"
        assert self.tokenizer is not None, "without a tokenizer, logprobs named by text are refused (ServedModel)"
        return token_text(self.tokenizer, token_id)


def check_prompt_logprob_work(ids_list: list[list[int]], n: int, k: int | None, param: str) -> None:
    """A 400, before any work is done, for a request whose prompt logprobs (top `k` beside each prompt token, for
    each of `n` choices of each prompt) would exceed MAX_PROMPT_LOGPROB_ENTRIES."""
    if k is None:
        return
    positions = sum(len(ids) - 1 for ids in ids_list) * n  # the first prompt token has no logprob
    entries = positions * (k + 1)
    if entries > MAX_PROMPT_LOGPROB_ENTRIES:
        raise ApiError(
            400,
            f"prompt logprobs for {positions} prompt tokens (every prompt, n={n} choices each) × {k + 1} logprobs "
            f"per token make {entries} entries; a request may ask for at most {MAX_PROMPT_LOGPROB_ENTRIES}: send "
            "fewer or shorter prompts, a smaller n or fewer logprobs",
            param=param,
        )


def usage_of(prompt_tokens: int, completion_tokens: int, cached_tokens: int | None) -> Usage:
    """OpenAI's usage, with the prompt tokens the prefix cache served (prompt_tokens_details.cached_tokens) unless
    `cached_tokens` is None."""
    details = None if cached_tokens is None else PromptTokensDetails(cached_tokens)
    return Usage(prompt_tokens, completion_tokens, prompt_tokens + completion_tokens, details)


def prompt_logprobs(tokenizer: Tokenizer | None, prompt: list[PromptTokenLogprobs] | None, k: int) -> PromptLogprobs:
    """vLLM's prompt_logprobs: None for the first prompt token, then each prompt token's own logprob and rank
    and the top k there (-inf written as -9999, as vLLM does), keyed by token id; each token's text, or None
    from a server without a tokenizer (as vLLM's decoded_token)."""

    def text(token: int) -> str | None:
        return token_text(tokenizer, token) if tokenizer is not None else None

    out: PromptLogprobs = [None]
    for token, lp, rank, top in prompt or ():
        entry = {token: PromptLogprob(max(lp, -9999.0), rank, text(token))}
        for r, (i, v) in enumerate(top[:k], 1):
            entry.setdefault(i, PromptLogprob(max(v, -9999.0), r, text(i)))
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
