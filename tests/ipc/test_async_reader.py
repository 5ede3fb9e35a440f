"""The asyncio side of a ring (ipc/async_reader.py): a reader thread hands batches of frames to the loop."""

import os
import threading

from ringllm.ipc.lifecycle import (
    segment_name,
)
from ringllm.ipc.ring import RingReader, RingWriter

_counter = iter(range(10**9))


def _name():
    return segment_name(os.getpid(), f"t{next(_counter)}")


def test_async_reader_thread_hands_batches_to_the_loop():
    import asyncio

    from ringllm.ipc.async_reader import AsyncRingReader

    name = _name()
    w = RingWriter(name, capacity=4096)

    async def main():
        got = []
        done = asyncio.Event()

        def on_frames(frames):
            got.extend(frames)
            if len(got) == 100:
                done.set()

        reader = AsyncRingReader(RingReader(name), on_frames, asyncio.get_running_loop())
        threading.Thread(target=lambda: [w.write(b"%d" % i) for i in range(100)]).start()
        await asyncio.wait_for(done.wait(), 5)
        reader.stop()
        return got

    assert asyncio.run(main()) == [b"%d" % i for i in range(100)]
    w.close()
