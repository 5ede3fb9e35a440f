"""The model as the OpenAI routes see it, and the work each of them does before the engine: the model name a
request asks for, its texts tokenized (bounded, and off the event loop when long), and its engine parameters
checked against the context and the vocabulary.

With --skip-tokenizer-init (vLLM's option) the worker has no tokenizer: prompts come as token ids and answers go
back as token ids with empty text, as in vLLM; what needs text is a 400 saying so (`require_tokenizer`), refused
before any work rather than answered without it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import msgspec

from ringllm.app.errors import CONTEXT_LENGTH_EXCEEDED, ApiError
from ringllm.app.schemas import GUIDED
from ringllm.app.settings import WorkerSettings
from ringllm.ipc import messages as m
from ringllm.ipc.process import trim_heap
from ringllm.ipc.sampling import FieldError, check_token_ids
from ringllm.text.bad_words import bad_words_token_ids
from ringllm.text.tokenizer import Tokenizer

OFF_LOOP_CHARS = 16_384  # longer texts are tokenized on a thread: 5 MiB takes seconds
# Tokenizing costs ~250 bytes a token at its peak (the tokenizer's encoding: token strings, offsets): an 8 MB text
# took 1.4 GB. Long texts are tokenized one at a time, on one thread, so a worker's peak is one text's, not one
# per concurrent request (six 8 MB requests grew a worker to 7.5 GB), and the heap is handed back after each.
NO_TOKENIZER = (
    "this server runs without the model's tokenizer (--skip-tokenizer-init): it takes prompts as token ids and "
    "answers in token ids (return_token_ids), with empty text"
)


class ServedModel:
    def __init__(self, tokenizer: Tokenizer | None, settings: WorkerSettings):
        """`tokenizer`: None with --skip-tokenizer-init."""
        self.optional_tokenizer = tokenizer
        self.names, self.path = settings.served_models, settings.model_path
        self.name = settings.served_model  # what answers report
        self.max_seq_len = settings.max_seq_len
        # the model's vocabulary; its tokenizer may know fewer ids
        self.vocab_size = settings.vocab_size or (tokenizer.vocab_size if tokenizer is not None else 0)
        # a longer text cannot fit
        self.max_text_chars = self.max_seq_len * (tokenizer.max_token_chars if tokenizer is not None else 0)
        self.sampling_defaults = settings.sampling_defaults  # generation_config.json's, for fields left unset
        # vLLM's server options that shape requests and answers:
        self.prompt_tokens_details = settings.enable_prompt_tokens_details  # --enable-prompt-tokens-details
        self.max_logprobs = settings.max_logprobs  # --max-logprobs
        self.priority_scheduling = settings.priority_scheduling  # --scheduling-policy priority
        self.force_include_usage = settings.force_include_usage  # --enable-force-include-usage
        self.return_tokens_as_token_ids = settings.return_tokens_as_token_ids  # --return-tokens-as-token-ids
        self.long_texts = ThreadPoolExecutor(1, thread_name_prefix="tokenize")  # see OFF_LOOP_CHARS

    @property
    def tokenizer(self) -> Tokenizer:
        """The model's tokenizer, for work that needs text (a 400 on a server without one)."""
        return self.require_tokenizer()

    def require_tokenizer(self, param: str | None = None, what: str = "this request") -> Tokenizer:
        """The tokenizer, or a 400 saying that `what` needs the one this server runs without."""
        if self.optional_tokenizer is None:
            raise ApiError(400, f"{what} needs text, and {NO_TOKENIZER}", param=param)
        return self.optional_tokenizer

    def cached_report(self, cached_tokens: int) -> int | None:
        """What usage reports of the prompt tokens the prefix cache served: nothing unless
        --enable-prompt-tokens-details, as vLLM (whose own tests compare the usage without it)."""
        return cached_tokens if self.prompt_tokens_details else None

    def check_name(self, model: str | None) -> None:
        if model is not None and model not in self.names:
            names = ", ".join(map(repr, self.names))
            raise ApiError(
                404, f"model {model!r} does not exist; this server serves {names}", "not_found_error", "model"
            )

    async def tokenize(
        self,
        text: str,
        add_special_tokens: bool = False,
        encode: Callable[[str], list[int]] | None = None,
        bound: bool = True,
        param: str = "prompt",
    ) -> list[int]:
        """The token ids of a prompt text. A text longer than the context could hold even at the tokenizer's
        longest token is refused before tokenizing (with `bound`); a long text is tokenized off the event loop,
        so the worker goes on serving (and answering /health) meanwhile. `encode` replaces the tokenizer's
        (a chat's own encoding)."""
        tok = self.require_tokenizer(param, f"a text {param}")
        if bound and len(text) > self.max_text_chars:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_seq_len} tokens. However, the {param} has "
                f"{len(text)} characters: more than that can hold ({self.max_text_chars} characters at most).",
                param=param,
                code=CONTEXT_LENGTH_EXCEEDED,
            )

        def run() -> list[int]:
            return encode(text) if encode is not None else tok.encode(text, add_special_tokens)

        if len(text) < OFF_LOOP_CHARS:
            return run()
        return await asyncio.get_running_loop().run_in_executor(self.long_texts, _trimmed, run)

    def check_count(self, count: int, what: str, param: str) -> None:
        """Refuses more items (messages, token ids) than the context has tokens, before any work on them: no
        sequence this model reads or writes is longer."""
        if count > self.max_seq_len:
            raise ApiError(
                400,
                f"{count} {what}: more than this model's context of {self.max_seq_len} tokens "
                f"(at most {self.max_seq_len})",
                param=param,
                code=CONTEXT_LENGTH_EXCEEDED,
            )

    def truncated(self, body, ids: list[int], max_tokens: int | None, default_max_tokens: int | None) -> list[int]:
        """The prompt as the body's truncate_prompt_tokens asks: at most what the context holds beside the output
        (max_tokens, else the route's default, else one token), -1 meaning exactly that."""
        output = max_tokens if max_tokens is not None else default_max_tokens or 1
        try:
            return body.truncated_prompt(ids, self.max_seq_len - output)
        except FieldError as e:
            raise ApiError.bad_field(e) from None

    def sampling(
        self,
        body,
        prompts: list[list[int]],
        max_tokens: int | None,
        default_max_tokens: int | None,
        logprobs: int | None,
        param: str,
    ) -> m.Sampling:
        """The engine's parameters of a request body (its bounds were checked as it was decoded). An explicit
        max_tokens must fit the context after the longest prompt; without one, the default (or everything the
        context has left, or the model's generation_config default if less) is used; the model's defaults fill the
        sampling fields the body leaves unset. bad_words become the token sequences the sampler bans. Every token id (the
        prompts', under `param`, and those the parameters name) must be in the model's vocabulary."""
        longest = max(map(len, prompts))
        room = self.max_seq_len - longest
        if room < 1:
            raise ApiError.context_overflow(self.max_seq_len, longest, None, param, param)
        if max_tokens is not None and max_tokens > room:
            raise ApiError.context_overflow(self.max_seq_len, longest, max_tokens, param, "max_tokens")
        if max_tokens is None:  # as vLLM: the least of the room, the route's default and the model's
            candidates = (room, default_max_tokens, self.sampling_defaults.max_tokens)
            max_tokens = min(c for c in candidates if c is not None)
        try:
            params = body.sampling_params(self.sampling_defaults, max_tokens=max_tokens, logprobs=logprobs)
            if self.optional_tokenizer is None:
                self._check_without_tokenizer(body, params)
            if params.bad_words:  # the engine has no tokenizer: it bans their token sequences
                params = msgspec.structs.replace(
                    params, bad_words_token_ids=bad_words_token_ids(self.tokenizer, params.bad_words)
                )
            check_token_ids(self.vocab_size, prompts, params, field=param)
        except FieldError as e:
            raise ApiError.bad_field(e) from None
        self._check_server_options(body, params)
        return params

    def _check_without_tokenizer(self, body, params: m.Sampling) -> None:
        """What a request cannot have from a server without a tokenizer, each refused by name: stop strings and
        bad words (text), an output constraint (compiled over the tokenizer's vocabulary; vLLM refuses it too),
        and logprobs that would name their tokens by text (vLLM's return_tokens_as_token_ids names them by id)."""
        constraint = next((f for f in ("structured_outputs", *GUIDED) if getattr(body, f, None) is not None), None)
        needs_text = [
            ("stop", bool(params.stop), "stop strings", " (stop_token_ids end on token ids)"),
            ("bad_words", bool(params.bad_words), "bad words", " (logit_bias -100 bans a token id)"),
            (constraint or "response_format", params.structured_outputs is not None, "output constraints", ""),
        ]
        for field, asked, what, instead in needs_text:
            if asked:
                raise ApiError(400, f"{field}: {what} need the tokenizer, and {NO_TOKENIZER}{instead}", param=field)
        as_ids = body.return_tokens_as_token_ids
        if params.logprobs is not None and not (self.return_tokens_as_token_ids if as_ids is None else as_ids):
            raise ApiError(
                400,
                f"logprobs name each token by its text, and {NO_TOKENIZER}: ask for return_tokens_as_token_ids "
                "(token_id:<id>)",
                param="logprobs",
            )

    def _check_server_options(self, body, params: m.Sampling) -> None:
        """What the server's options allow, refused here, before a stream starts: more logprobs than
        --max-logprobs, a priority without --scheduling-policy priority (the engine would refuse it only once
        the request reached it)."""
        top = "top_logprobs" if hasattr(body, "top_logprobs") else "logprobs"  # chat's name for the count
        for field, count in ((top, params.logprobs), ("prompt_logprobs", params.prompt_logprobs)):
            if count is not None and count > self.max_logprobs:
                raise ApiError(
                    400,
                    f"{field}: {count} logprobs asked for; this server returns at most {self.max_logprobs} "
                    "(--max-logprobs)",
                    param=field,
                )
        if params.priority != 0 and not self.priority_scheduling:
            raise ApiError(
                400,
                f"priority {params.priority}: this server schedules first come, first served; a priority other "
                "than 0 needs --scheduling-policy priority",
                param="priority",
            )

    def listing(self) -> dict:
        """/v1/models: every name clients may use. `root` is the checkpoint's name, not its path: where the
        server keeps its files is the operator's (issue 28)."""
        entry = {"object": "model", "created": 0, "owned_by": "ringllm", "root": Path(self.path).name}
        entry.update(max_model_len=self.max_seq_len, vocab_size=self.vocab_size)
        return {"object": "list", "data": [{"id": name, **entry} for name in self.names]}


def _trimmed(run: Callable[[], list[int]]) -> list[int]:
    """`run`'s ids, then the tokenizer's transient heap handed back to the OS (see OFF_LOOP_CHARS)."""
    try:
        return run()
    finally:
        trim_heap()
