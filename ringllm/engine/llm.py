"""The offline API: `LLM` wraps an Engine, its tokenizer and a thread that drives the step loop.

llm = LLM()                                    # the demo model; LLM(model="path") for a checkpoint
results = llm.generate_batch(["Hi", "Yo"], SamplingParams(max_tokens=32))
async for out in llm.generate("Hi", params):   # streams
    print(out.text, end="")
"""

from __future__ import annotations

import asyncio
import itertools
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import msgspec

from ringllm.engine.config import EngineConfig
from ringllm.engine.engine import Engine, RequestError, TokenOutput
from ringllm.engine.loader import checkpoint_path
from ringllm.engine.logs import get_logger
from ringllm.engine.sampling_params import SamplingParams
from ringllm.text.bad_words import bad_words_token_ids
from ringllm.text.stream import TextStream
from ringllm.text.tokenizer import Tokenizer

log = get_logger("engine.llm")


@dataclass
class Completion:
    """A result, or a streamed delta of one: `text` and `token_ids` are what is new in this piece."""

    rid: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_tokens: int = 0
    logprobs: list[float] = field(default_factory=list)
    # With SamplingParams.prompt_logprobs: (logprob, top k) of prompt tokens 1, 2, ... (in the first piece)
    prompt_logprobs: list[tuple[float, list[tuple[int, float]]]] | None = None
    prompt_ranks: list[int] | None = None  # with prompt_logprobs: each of those prompt tokens' rank

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


class _Request:
    """Host-side state of one request: its text stream (text/stream.py, as the API workers use it) and where
    its pieces go."""

    def __init__(self, rid, prompt_ids, params, tokenizer, sink: Callable[[Completion], None]):
        self.rid, self.params, self.sink = rid, params, sink
        self.text = TextStream(tokenizer, prompt_ids, params.stop, params.min_tokens)
        self.prompt_tokens = len(prompt_ids)

    def on_output(self, out: TokenOutput) -> tuple[bool, bool]:
        """Turns one engine output into a Completion piece; returns (whether the request has ended here,
        whether the engine still runs it: a stop string ended it, and the caller aborts it there)."""
        piece = Completion(self.rid, prompt_tokens=self.prompt_tokens, finish_reason=out.finish_reason)
        new = [] if out.token_id is None else [out.token_id]
        if new:
            piece.token_ids = new
            if out.logprob is not None:
                piece.logprobs = [out.logprob]
            piece.prompt_logprobs, piece.prompt_ranks = out.prompt_logprobs, out.prompt_ranks
        text = self.text.feed(new, out.finish_reason)
        piece.text, piece.finish_reason = text.text, text.finish_reason
        if out.error is not None:
            piece.text = f"error: {out.error}"
        self.sink(piece)
        return piece.finished, text.abort


class LLM:
    def __init__(self, model: str | None = None, config: EngineConfig | None = None, **overrides):
        config = config or EngineConfig(model=model, **overrides)
        self.config = config
        # The tokenizer first: a missing one fails before any weights are loaded, naming the file.
        self.tokenizer = Tokenizer(config.tokenizer or checkpoint_path(config.model, config.download_dir))
        self.engine = Engine(config)
        self._ids = itertools.count()
        self._commands: deque = deque()
        self._requests: dict[str, _Request] = {}
        self._wake = threading.Event()
        self._closed = False
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._loop, name="ringllm-engine", daemon=True)
        self._thread.start()

    # ---- public API ----
    def encode(self, prompt: str | list[int]) -> list[int]:
        """A text prompt gets the tokenizer's special tokens (Llama's BOS), as in transformers and in the
        server's /v1/completions; token ids are used as given."""
        return list(prompt) if isinstance(prompt, list) else self.tokenizer.encode(prompt, add_special_tokens=True)

    def generate_batch(
        self, prompts: list[str | list[int]], params: SamplingParams | list[SamplingParams] | None = None
    ) -> list[Completion]:
        """Runs every prompt to completion together; results in prompt order."""
        params_list = params if isinstance(params, list) else [params or SamplingParams()] * len(prompts)
        results = [Completion(f"batch-{next(self._ids)}") for _ in prompts]
        remaining = [len(prompts)]
        done = threading.Event()

        def sink_for(result: Completion):
            def sink(piece: Completion):
                result.text += piece.text
                result.token_ids += piece.token_ids
                result.logprobs += piece.logprobs
                result.prompt_logprobs = result.prompt_logprobs or piece.prompt_logprobs
                result.prompt_ranks = result.prompt_ranks or piece.prompt_ranks
                result.prompt_tokens = piece.prompt_tokens
                if piece.finished:
                    result.finish_reason = piece.finish_reason
                    remaining[0] -= 1
                    if remaining[0] == 0:
                        done.set()

            return sink

        submitted = [(r.rid, *self._prepare(p, sp), sink_for(r)) for r, p, sp in zip(results, prompts, params_list)]
        for _rid, ids, sp, _ in submitted:
            self._check(ids, sp)
        for item in submitted:
            self._submit(*item)
        if prompts:
            while not done.wait(0.1):
                self._raise_if_dead()
        return results

    async def generate(
        self, prompt: str | list[int], params: SamplingParams | None = None
    ) -> AsyncIterator[Completion]:
        """Streams pieces of one completion; the last has `finish_reason` set. Leaving the loop early aborts."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Completion] = asyncio.Queue()
        rid = f"gen-{next(self._ids)}"
        ids, params = self._prepare(prompt, params or SamplingParams())
        self._check(ids, params)
        self._submit(rid, ids, params, lambda piece: loop.call_soon_threadsafe(queue.put_nowait, piece))
        finished = False
        try:
            while not finished:
                piece = await queue.get()
                finished = piece.finished
                yield piece
        finally:
            if not finished:
                self._commands.append(("abort", rid))
                self._wake.set()

    def close(self) -> None:
        self._closed = True
        self._wake.set()
        self._thread.join(timeout=10)
        self.engine.stop_profile()
        self.engine.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- the engine thread ----
    def _prepare(self, prompt: str | list[int], params: SamplingParams) -> tuple[list[int], SamplingParams]:
        """The prompt's token ids and the parameters as the engine takes them, as the API worker makes them: the
        prompt cut as truncate_prompt_tokens asks, bad_words as the token sequences the sampler bans. Raises
        ValueError (FieldError) for what cannot be served."""
        if params.bad_words and params.bad_words_token_ids is None:
            words = bad_words_token_ids(self.tokenizer, params.bad_words)
            params = msgspec.structs.replace(params, bad_words_token_ids=words)
        return params.truncated_prompt(self.encode(prompt), self.engine.max_seq_len - params.max_tokens), params

    def _check(self, ids: list[int], params: SamplingParams) -> None:
        """Rejects what the engine would reject, in the caller's thread, before anything is queued."""
        self.engine.check_request(ids, params)
        self.engine.check_grammar(params)

    def _submit(self, rid, ids, params, sink) -> None:
        self._raise_if_dead()
        self._commands.append(("add", _Request(rid, ids, params, self.tokenizer, sink), ids))
        self._wake.set()

    def _raise_if_dead(self) -> None:
        if self._error is not None:
            raise RuntimeError("the engine thread has failed") from self._error

    def _loop(self) -> None:
        try:
            while not self._closed:
                self._drain_commands()
                if not self.engine.has_work:
                    self._wake.wait()
                    self._wake.clear()
                    continue
                for out in self.engine.step():
                    self._deliver(out)
        except BaseException as e:  # surfaced to callers by _raise_if_dead
            log.exception("engine thread failed")
            self._error = e

    def _drain_commands(self) -> None:
        while self._commands:
            cmd = self._commands.popleft()
            if cmd[0] == "add":
                req, ids = cmd[1], cmd[2]
                self._requests[req.rid] = req
                try:
                    self.engine.add_request(req.rid, ids, req.params)
                except RequestError as e:
                    del self._requests[req.rid]
                    req.sink(Completion(req.rid, text=f"error: {e}", finish_reason="error"))
            elif cmd[0] == "abort":
                self._requests.pop(cmd[1], None)
                self.engine.abort(cmd[1])

    def _deliver(self, out: TokenOutput) -> None:
        req = self._requests.get(out.rid)
        if req is None:
            return
        try:
            ended, running = req.on_output(out)
        except Exception:  # the consumer is gone (its event loop closed): drop the request, keep serving
            log.warning("dropping a request whose consumer failed", rid=out.rid, exc_info=True)
            del self._requests[out.rid]
            self.engine.abort(out.rid)
            return
        if ended:
            del self._requests[out.rid]
            if running:  # ended by a stop string
                self.engine.abort(out.rid)
