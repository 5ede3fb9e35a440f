"""Structured outputs: grammar-constrained decoding with xgrammar.

A constrained request's grammar (a JSON schema, any JSON object, a regex, a choice of strings or an EBNF
grammar) is compiled once per (kind, text) off the step loop: a small thread pool (engine/grammar_pool.py) hands
each compile to a child process (engine/grammar_process.py), which is killed when the compile overruns or its
requests all left; the request waits for it outside the scheduler's queue. Once admitted it has its own GrammarMatcher, which accepts each token as it is
read back. Before a step samples, the matchers of its constrained rows fill one bitmask each (bit j set: token j
allowed), and the sampler sets every other logit to -inf. When the grammar is complete only the stop tokens are
allowed, and the request ends once its matcher has accepted one.

xgrammar (and the tokenizer it reads the vocabulary from) is imported and built on the first constrained
request, so an engine that never gets one pays nothing."""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future

import torch

from ringllm.engine.grammar_pool import CompileThreads
from ringllm.engine.grammar_process import COMPILE_SECONDS, CompileAbandoned, CompileProcess, GrammarError
from ringllm.engine.logs import get_logger
from ringllm.engine.sampler import GrammarMask
from ringllm.ipc.process import trim_heap
from ringllm.ipc.sampling import StructuredOutputs

log = get_logger("engine.grammar")

# The defaults of EngineConfig's grammar settings, for a Grammars built without one. The cache is bounded by its
# grammars' bytes (xgrammar's own estimate, plus the key's text), not their count: a count would let a few huge
# grammars (a 20,000-alternative regex is ~28 MB on a 1k vocab) hold gigabytes.
GRAMMAR_CACHE_BYTES = 128 * 1024 * 1024
FAILED_ENTRY_BYTES = 1024  # a failed compile is cached too (its error), so that a repeat is refused at once
# A request's token mask may take this long to fill per step; an ambiguous grammar whose mask work grows with
# every token (s ::= "a" s | s "a" | s s | "a") ends with an error instead of stalling every other request.
MASK_BUDGET_SECONDS = 0.05
COMPILE_THREADS = 2
# Distinct grammars waiting for a compile thread; one more is refused (503) rather than queued behind them. The
# requests of one fan-out (prompts x n) share their grammar's compile.
MAX_QUEUED_COMPILES = 16


class CompileQueueFull(RuntimeError):
    """Too many distinct grammars wait to be compiled; the message says so (the server answers 503)."""


class Grammars:
    """Compiles constraints for one engine and makes the matchers and masks of its requests."""

    def __init__(
        self,
        load_tokenizer: Callable[[], object],
        vocab_size: int,
        stop_token_ids: list[int],
        cache_bytes: int = GRAMMAR_CACHE_BYTES,
        mask_budget: float = MASK_BUDGET_SECONDS,
        compile_timeout: float = COMPILE_SECONDS,
    ):
        self._load_tokenizer = load_tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self.cache_bytes, self.mask_budget = cache_bytes, mask_budget
        self._pool: CompileThreads | None = None
        self._compiler: Future | None = None
        self._cache: OrderedDict[tuple, Future] = OrderedDict()
        self._sizes: dict[tuple, int] = {}  # bytes of each cached grammar whose compile has ended
        self._lock = threading.Lock()  # compile() is called from the engine thread and from callers of check
        self.num_compiles = 0  # compiles asked for (one per distinct constraint while it stays cached)
        self.num_compiles_run = 0  # of those, compiles that ran (not cancelled while they waited)
        self.compile_timeout = compile_timeout
        self._abandoned: set[tuple] = set()  # keys of running compiles nobody waits for any more: stop them
        self._local = threading.local()  # each compile thread's CompileProcess
        self._processes: list[CompileProcess] = []

    # ---- compiling ----
    def compile(self, spec: StructuredOutputs) -> Future:
        """The compiled grammar of `spec` as a future; the same one for every request with the same spec."""
        key = spec.key
        with self._lock:
            future = self._cache.get(key)
            if future is not None and not _abandoned(future):
                self._abandoned.discard(key)  # someone waits for it again
                self._cache.move_to_end(key)
                return future
            if self._pool is None:
                self._pool = CompileThreads(COMPILE_THREADS, "grammar")
                self._compiler = self._pool.submit(self._make_compiler)
            if self._pool.queued >= MAX_QUEUED_COMPILES:
                raise CompileQueueFull(
                    f"the grammar compile queue is full ({MAX_QUEUED_COMPILES} distinct grammars wait); try again later"
                )
            future = self._cache[key] = self._pool.submit(self._compile, key)
            self.num_compiles += 1
        future.add_done_callback(lambda f: self._cached(key, f))
        return future

    def _cached(self, key: tuple, future: Future) -> None:
        """A compile ended: its bytes count against the cache, and the least recently used grammars go until
        the cache fits (those still compiling stay: requests wait on them)."""
        with self._lock:
            if self._cache.get(key) is not future:
                return  # dropped meanwhile
            if _abandoned(future):  # nobody waited any more: a later request compiles it anew
                del self._cache[key]
                self._abandoned.discard(key)
                return
        compiled = None if future.exception() is not None else future.result()
        size = len(key[1]) + (compiled.memory_size_bytes if compiled is not None else FAILED_ENTRY_BYTES)
        with self._lock:
            if self._cache.get(key) is not future:
                return
            self._sizes[key] = size
            evicted = False
            for old in list(self._cache):
                if self.cache_size <= self.cache_bytes or old == key:
                    break
                if old in self._sizes:
                    del self._cache[old], self._sizes[old]
                    evicted = True
        if evicted:
            # glibc keeps the evicted grammars' heap otherwise (measured: 23 grammars of 26 MB, cache bounded at
            # 106 MB, RSS 1.09 GB; 0.50 GB after a trim)
            trim_heap()

    @property
    def cache_size(self) -> int:
        """Bytes held by the compiled grammars in the cache."""
        return sum(self._sizes.values())

    def _make_compiler(self):
        import xgrammar

        info = xgrammar.TokenizerInfo.from_huggingface(
            self._load_tokenizer(), vocab_size=self.vocab_size, stop_token_ids=self.stop_token_ids or None
        )
        log.info("grammar compiler ready", vocab_size=self.vocab_size, vocab_type=info.vocab_type.name)
        return info, info.serialize_json()

    def _compile(self, key: tuple[str, str, bool]):
        """The compiled grammar of `key`; GrammarError if it does not compile or allows no first token (an
        unsatisfiable grammar is refused like one that does not compile, not run to an "error" finish)."""
        compiled = self._compile_text(key)
        if not self._allows_a_token(compiled):
            raise GrammarError(f"structured_outputs.{key[0]}: the constraint allows no output with this vocabulary")
        return compiled

    def _allows_a_token(self, compiled) -> bool:
        import xgrammar

        matcher = self.matcher(compiled)
        if matcher.is_terminated():
            return True
        bitmask = xgrammar.allocate_token_bitmask(1, self.vocab_size)
        matcher.fill_next_token_bitmask(bitmask, 0)
        logits = torch.zeros(1, self.vocab_size)
        xgrammar.apply_token_bitmask_inplace(logits, bitmask, vocab_size=self.vocab_size)
        return bool(torch.isfinite(logits).any())

    def _compile_text(self, key: tuple[str, str, bool]):
        """Compiles in this thread's child process (engine/grammar_process.py) and reads the result back."""
        import xgrammar

        self.num_compiles_run += 1
        assert self._compiler is not None  # submitted with the pool, before any compile
        info, info_json = self._compiler.result()
        process = getattr(self._local, "process", None)
        if process is None:
            process = self._local.process = CompileProcess(info_json)
            with self._lock:
                self._processes.append(process)
        process.timeout = self.compile_timeout
        serialized = process.compile(key, lambda: key in self._abandoned)
        return xgrammar.CompiledGrammar.deserialize_json(serialized, info)

    def abandon(self, spec: StructuredOutputs | None, future: Future) -> None:
        """Nobody waits for `future` (the compile of `spec`) any more: a compile not yet started never runs, a
        running one is killed."""
        if spec is not None and not future.cancel() and not future.done():
            with self._lock:
                self._abandoned.add(spec.key)

    def matcher(self, compiled):
        """A request's place in its grammar: accept_token() each token read back; is_terminated() once the
        grammar is complete and its stop token accepted (or at once, for a model without stop tokens)."""
        import xgrammar

        stop = self.stop_token_ids
        return xgrammar.GrammarMatcher(
            compiled, override_stop_tokens=stop or None, terminate_without_stop_token=not stop
        )

    # ---- masks ----
    def masks(self, matchers: list, device: torch.device) -> tuple[GrammarMask | None, dict[int, str]]:
        """The bitmask of every batch row whose matcher is given (None: unconstrained, or not sampled), and the
        rows whose mask took longer than the budget, each with the error that ends its request. Filling runs
        while the step's forward does (the engine queues it first); the budget bounds what one request's
        grammar can add to every step, since its mask work only grows with its output."""
        index = [i for i, m in enumerate(matchers) if m is not None and not m.is_terminated()]
        if not index:
            return None, {}
        import xgrammar

        bitmask = xgrammar.allocate_token_bitmask(len(index), self.vocab_size)
        over: dict[int, str] = {}
        for j, i in enumerate(index):
            start = time.perf_counter()
            matchers[i].fill_next_token_bitmask(bitmask, j)
            took = time.perf_counter() - start
            if took > self.mask_budget:
                over[i] = (
                    f"structured_outputs: the grammar's token mask took {took * 1e3:.0f} ms to compute, over this "
                    f"server's budget of {self.mask_budget * 1e3:.0f} ms per token (an ambiguous grammar's work "
                    "grows with its output); make the grammar unambiguous"
                )
        rows = torch.tensor(index, dtype=torch.long)
        if device.type == "cuda":
            # Both copies from pinned memory, without waiting: a copy from pageable memory synchronizes the
            # stream, so the host would wait for this step's forward and lose the overlap with the next step.
            bitmask, rows = bitmask.pin_memory(), rows.pin_memory()
        return GrammarMask(bitmask.to(device, non_blocking=True), rows.to(device, non_blocking=True)), over

    def close(self) -> None:
        """Drops the compiles not yet started; one running ends on its daemon thread (nothing waits for it)."""
        if self._pool is not None:
            self._pool.shutdown(COMPILE_THREADS)
        with self._lock:
            processes, self._processes = self._processes, []
        for process in processes:
            process.close()


def _abandoned(future: Future) -> bool:
    return future.cancelled() or (future.done() and isinstance(future.exception(), CompileAbandoned))
