"""The app side's reader: a thread that blocks on the ring (spin, then semaphore) and hands every batch of
frames it drained to the event loop in one call, so the loop never blocks and never polls."""

from __future__ import annotations

import threading

from ringllm.ipc.ring import RingError, RingReader


class AsyncRingReader:
    def __init__(self, reader: RingReader, on_frames, loop, on_error=None):
        """`on_frames(list[bytes])` and `on_error(exc)` run on `loop`."""
        self.reader, self.on_frames, self.loop, self.on_error = reader, on_frames, loop, on_error
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"ring-reader {reader.name}", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.reader.wait(0.2):
                    continue
                batch: list[bytes] = []
                self.reader.poll(lambda view: batch.append(bytes(view)))  # noqa: B023 (called within this turn)
                if batch:
                    self.loop.call_soon_threadsafe(self.on_frames, batch)
        except RingError as e:
            if self.on_error is not None and not self.loop.is_closed():
                self.loop.call_soon_threadsafe(self.on_error, e)

    def stop(self) -> None:
        self._stop.set()
        self.thread.join(timeout=2)
