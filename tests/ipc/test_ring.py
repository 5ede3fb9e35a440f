"""Rings between real processes: every frame once, in order, byte-identical; dead peers are noticed;
corrupt data gives a clear error."""

import multiprocessing as mp
import os
import random
import signal
import time

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ringllm.ipc import messages as m
from ringllm.ipc.lifecycle import (
    segment_name,
)
from ringllm.ipc.ring import PeerDied, RingCorrupted, RingReader, RingWriter

CTX = mp.get_context("fork")
_counter = iter(range(10**9))


def _name():
    return segment_name(os.getpid(), f"t{next(_counter)}")


def _payload(i: int, size: int) -> bytes:
    return random.Random(i * 7919 + size).randbytes(size)


def _write_all(name, sizes, jitter):
    w = RingWriter(name, create=False, timeout=20)
    rng = random.Random(len(sizes))
    for i, size in enumerate(sizes):
        w.write(_payload(i, size))
        if jitter and rng.random() < 0.05:
            time.sleep(rng.random() * 1e-3)
    w.close()


def _read_all(reader, count, jitter=False):
    got, rng = [], random.Random(count)
    while len(got) < count:
        if not reader.wait(5.0):
            raise AssertionError(f"stalled after {len(got)} of {count} frames")
        reader.poll(lambda v: got.append(bytes(v)), limit=rng.randint(1, 8) if jitter else 1 << 30)
        if jitter and rng.random() < 0.05:
            time.sleep(rng.random() * 1e-3)
    return got


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 3 * 4096), min_size=1, max_size=60), st.booleans())
def test_random_frames_between_processes(sizes, jitter):
    name = _name()
    reader = RingReader(name, create=True, capacity=4096)
    proc = CTX.Process(target=_write_all, args=(name, sizes, jitter))
    proc.start()
    try:
        got = _read_all(reader, len(sizes), jitter)
    finally:
        proc.join(10)
        reader.close()
    assert got == [_payload(i, s) for i, s in enumerate(sizes)]


def test_wrap_at_every_offset():
    for offset in range(0, 4096, 8):
        name = _name()
        w = RingWriter(name, capacity=4096)
        r = RingReader(name)
        got, fill, sizes = [], offset, []
        while fill:  # filler frames (a frame is its payload + 4, padded to 8) put the head at `offset`
            sizes.append(min(fill, 1024) - 4)
            fill -= min(fill, 1024)
        sizes += [40, 0, 1000, 2000]
        for i, size in enumerate(sizes):
            w.write(_payload(offset + i, size))
            r.poll(lambda v: got.append(bytes(v)))  # noqa: B023 (called within this turn)
        assert got == [_payload(offset + i, size) for i, size in enumerate(sizes)]
        w.close()
        r.close()


def test_stress_many_frames_small_ring():
    name = _name()
    reader = RingReader(name, create=True, capacity=8192)
    rng = random.Random(5)
    sizes = [rng.choice([0, 3, 8, 61, 200, 900, 2500, 9000]) for _ in range(20_000)]
    proc = CTX.Process(target=_write_all, args=(name, sizes, False))
    proc.start()
    got = _read_all(reader, len(sizes))
    proc.join(10)
    reader.close()
    assert got == [_payload(i, s) for i, s in enumerate(sizes)]


def _write_forever(name):
    w = RingWriter(name, create=False, timeout=60)
    while True:
        w.write(b"y" * 100)


def test_writer_killed_reader_raises():
    name = _name()
    reader = RingReader(name, create=True, capacity=4096)
    proc = CTX.Process(target=_write_forever, args=(name,))
    proc.start()
    time.sleep(0.2)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    t0 = time.monotonic()
    with pytest.raises(PeerDied):
        while True:
            reader.poll(lambda v: None)
            reader.wait(2.0)
    assert time.monotonic() - t0 < 1.5
    reader.close()


def _read_slowly_then_hang(name):
    r = RingReader(name, create=False)
    r.poll(lambda v: None)
    time.sleep(60)


def test_reader_killed_writer_raises():
    name = _name()
    writer = RingWriter(name, capacity=4096, timeout=30)
    proc = CTX.Process(target=_read_slowly_then_hang, args=(name,))
    proc.start()
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join()
    t0 = time.monotonic()
    with pytest.raises(PeerDied):
        for _ in range(1000):
            writer.write(b"z" * 500)
    assert time.monotonic() - t0 < 1.5
    writer.close()


def test_corrupt_length_is_a_clear_error():
    name = _name()
    w = RingWriter(name, capacity=4096)
    r = RingReader(name)
    w.write(b"hello")
    w.seg.data[0:4] = (5000).to_bytes(4, "little")  # a frame longer than the ring
    with pytest.raises(RingCorrupted, match="overruns"):
        r.poll(lambda v: None)
    w.close()
    r.close()


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300))
def test_fuzzed_bytes_never_crash_or_hang(blob):
    name = _name()
    w = RingWriter(name, capacity=4096)
    r = RingReader(name)
    try:
        w.seg.data[: len(blob)] = blob
        w.seg.words[0] = len(blob) - len(blob) % 8  # pretend it was published
        decoded = []
        try:
            r.poll(lambda v: decoded.append(m.decode_to_engine(v)))
        except (RingCorrupted, msgspec.DecodeError, msgspec.ValidationError) as e:
            assert str(e)  # a clear error, never a crash or a hang
        assert all(isinstance(x, (m.Generate, m.Abort, m.Control)) for x in decoded)
    finally:
        w.close()
        r.close()


def _broadcast_reader(name, index, count, q):
    r = RingReader(name, index=index)
    q.put(_read_all(r, count) == [_payload(i, 300 + i) for i in range(count)])


def test_broadcast_ring_every_reader_gets_everything():
    name = _name()
    w = RingWriter(name, capacity=8192, num_readers=3)
    q = CTX.Queue()
    procs = [CTX.Process(target=_broadcast_reader, args=(name, i, 500, q)) for i in range(3)]
    for p in procs:
        p.start()
    time.sleep(0.2)
    for i in range(500):
        w.write(_payload(i, 300 + i))
    assert [q.get(timeout=20) for _ in procs] == [True, True, True]
    for p in procs:
        p.join(5)
    w.close()


def test_try_write_never_waits_and_resumes_a_split_message():
    """A full ring makes try_write return at once; a message larger than a fragment goes out fragment by
    fragment over several calls and arrives whole, after the frames written before it."""
    name = _name()
    reader = RingReader(name, create=True, capacity=4096)
    writer = RingWriter(name, create=False)
    try:
        small, big = _payload(1, 900), _payload(2, 3000)  # a fragment holds 1016 bytes: big needs 3
        written = 0
        while writer.try_write(small) == len(small):
            written += 1
        assert written == 4  # 4 × 912 bytes of frames; a fifth does not fit 4096
        assert writer.try_write(big) == 0  # no room for even its first fragment: nothing written
        got, reached, calls = [], 0, 0
        while reached < len(big):
            reached = writer.try_write(big, reached)
            calls += 1
            reader.poll(lambda v: got.append(bytes(v)), limit=1)  # room for about one fragment at a time
        reader.poll(lambda v: got.append(bytes(v)))
        assert calls > 3 and got == [small] * written + [big]
    finally:
        writer.close()
        reader.close()


def test_a_reset_drops_what_a_dead_writer_left_half_written():
    """A writer that died between the fragments of a message leaves the reader a partial message; the next
    writer's reset makes the reader drop it (and say so) instead of gluing the next message onto it."""
    name = _name()
    reader = RingReader(name, create=True, capacity=4096)
    resets = []
    reader.on_reset = lambda: resets.append(True)
    try:
        dead = RingWriter(name, create=False)
        small, big = _payload(1, 900), _payload(2, 3000)  # big: three fragments of 1016 bytes at most
        assert dead.try_write(small) == dead.try_write(small) == len(small)
        assert 0 < dead.try_write(big) < len(big)  # two of its fragments fit: then the writer "dies"
        dead.close()
        got = []
        reader.poll(lambda v: got.append(bytes(v)))
        assert got == [small, small]
        new = RingWriter(name, create=False)
        new.write_reset()
        new.write(b"after the reset")
        reader.poll(lambda v: got.append(bytes(v)))
        assert got == [small, small, b"after the reset"] and resets == [True]
        new.close()
    finally:
        reader.close()
