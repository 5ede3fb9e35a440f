"""The threads grammars compile on. Not concurrent.futures.ThreadPoolExecutor, whose threads the interpreter
joins at exit: a drained engine process would then wait for a compile that nobody needs any more (a crafted
schema compiles for minutes). These threads are daemons, and work not yet started is counted (the compile
queue is bounded) and can be cancelled through its Future."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future


class CompileThreads:
    def __init__(self, num_threads: int, name: str):
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._pending: set[Future] = set()  # submitted, not yet started (and not cancelled)
        self._lock = threading.Lock()
        for k in range(num_threads):
            threading.Thread(target=self._run, name=f"{name}-{k}", daemon=True).start()

    @property
    def queued(self) -> int:
        """Work submitted and not yet started."""
        with self._lock:
            return sum(not f.cancelled() for f in self._pending)

    def submit(self, fn: Callable, *args) -> Future:
        future: Future = Future()
        with self._lock:
            self._pending.add(future)
        self._queue.put((future, fn, args))
        return future

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn, args = item
            with self._lock:
                self._pending.discard(future)
            if not future.set_running_or_notify_cancel():
                continue  # cancelled while it waited
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # the future carries it to whoever waits
                future.set_exception(e)

    def shutdown(self, num_threads: int) -> None:
        """Cancels the work not yet started and lets the threads end once their current work does."""
        with self._lock:
            for future in self._pending:
                future.cancel()
            self._pending.clear()
        for _ in range(num_threads):
            self._queue.put(None)
