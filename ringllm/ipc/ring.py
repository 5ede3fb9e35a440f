"""Lock-free shared-memory rings: one writer, one or more readers, each reader with its own cursor.

Layout of the segment (posix_ipc shared memory):

    0     head: bytes ever written                      (own cache line)
    64    writer pid, capacity, number of readers
    128+  per reader i, one cache line each: tail (bytes ever read), sleeping flag, pid
    DATA  capacity bytes of frames

A frame is a 4-byte little-endian word and its payload, padded to 8 bytes. The word's low 31 bits are the
payload length and bit 31 says that more fragments of the same message follow (a message larger than a
quarter of the ring is split, never dropped). The word 0xFFFFFFFF marks the end of the data area: the next
frame starts at offset 0. The word 0xFFFFFFFE (no payload) says that a new writer took over the ring.

Counters are written as whole aligned 8-byte words through a memoryview cast to "Q" (struct.pack_into clears
the destination first, so another process could see a torn value). Python has no memory model, so a frame
is published only after a fence, and read only after one: a lock acquire/release is a full barrier.

Why one file of ~420 lines: the writer and the readers are two halves of one protocol over one layout (the
cursors, the wrap word, the takeover word, the fences); split, a change to one half could not be checked
against the other on the same screen."""

from __future__ import annotations

import mmap
import os
import struct
import threading
import time
from collections.abc import Callable

import posix_ipc

WRAP = 0xFFFFFFFF
RESET = 0xFFFFFFFE  # a new writer took over: drop any message the previous one left half-written
MORE = 0x80000000
HEADER = 128
READER_STRIDE = 64
_fence_lock = threading.Lock()
_U32 = struct.Struct("<I")
_pack_u32, _unpack_u32 = _U32.pack_into, _U32.unpack_from
_acquire, _release = _fence_lock.acquire, _fence_lock.release


def fence() -> None:
    """A full memory barrier: acquiring and releasing a lock is one on every platform CPython runs on."""
    _acquire()
    _release()


class RingError(RuntimeError):
    """Base of every ring failure."""


class RingTimeout(RingError):
    """The ring stayed full past the writer's timeout."""


class PeerDied(RingError):
    """The process at the other end has exited."""


class RingCorrupted(RingError):
    """A frame header does not describe a frame that fits the published data."""


def pid_alive(pid: int) -> bool:
    """True while `pid` runs. A zombie (exited, not yet reaped by its parent) counts as dead."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
        return state not in (b"Z", b"X")
    except (OSError, IndexError):
        return True  # no /proc: the signal check above is all there is


def map_segment(name: str, size: int | None = None) -> tuple[posix_ipc.SharedMemory, mmap.mmap]:
    """Creates the shared-memory segment `name` of `size` bytes (it must not exist yet), or with no size opens
    the existing one; returns it with its whole mapping."""
    if size is not None:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=size)
    else:
        shm = posix_ipc.SharedMemory(name)
    mapping = mmap.mmap(shm.fd, shm.size)
    shm.close_fd()
    return shm, mapping


def _data_offset(num_readers: int) -> int:
    return HEADER + READER_STRIDE * num_readers + (-(HEADER + READER_STRIDE * num_readers) % 4096)


class _Segment:
    """The mapped segment and its word views; shared by the writer and reader ends."""

    def __init__(self, name: str, create: bool, capacity: int = 0, num_readers: int = 1):
        if create and (capacity < 4096 or capacity & (capacity - 1)):
            raise ValueError("ring capacity must be a power of two >= 4096")
        self.name = name
        self.shm, self.map = map_segment(name, _data_offset(num_readers) + capacity if create else None)
        self.words = memoryview(self.map).cast("Q")  # aligned 8-byte stores: never torn
        if create:
            self.words[9], self.words[10] = capacity, num_readers
        self.capacity, self.num_readers = self.words[9], self.words[10]
        self.data_start = _data_offset(self.num_readers)
        self.data = memoryview(self.map)[self.data_start : self.data_start + self.capacity]
        self.sems = [self._sem(i, create) for i in range(self.num_readers)]
        self.space = posix_ipc.Semaphore(name + "-space", posix_ipc.O_CREAT, initial_value=0)

    def _sem(self, i: int, create: bool):
        return posix_ipc.Semaphore(f"{self.name}-r{i}", posix_ipc.O_CREAT, initial_value=0)

    # word indices
    HEAD, WRITER_PID, WRITER_WAITING = 0, 8, 11

    @staticmethod
    def tail_index(i: int) -> int:
        return (HEADER + READER_STRIDE * i) // 8

    def close(self) -> None:
        self.data.release()
        self.words.release()
        self.map.close()

    def unlink(self) -> None:
        for obj in [self.shm, *self.sems, self.space]:
            try:
                obj.unlink()
            except posix_ipc.ExistentialError:
                continue  # already unlinked by the other end
        for s in [*self.sems, self.space]:
            s.close()


class RingWriter:
    def __init__(
        self, name: str, capacity: int = 1 << 20, num_readers: int = 1, create: bool = True, timeout: float = 10.0
    ):
        self.seg = _Segment(name, create, capacity, num_readers)
        self.seg.words[_Segment.WRITER_PID] = os.getpid()
        self.owner = create
        self.timeout = timeout
        self.max_fragment = self.seg.capacity // 4 - 8
        self._head = self.seg.words[_Segment.HEAD]
        self._free = 0  # space known to be free; refreshed from the readers' tails only when it runs out
        self._sleep_flags = [_Segment.tail_index(i) + 1 for i in range(self.seg.num_readers)]
        self._single_flag = self._sleep_flags[0] if len(self._sleep_flags) == 1 else 0
        self._words, self._map, self._base = self.seg.words, self.seg.map, self.seg.data_start
        self._cap = self.seg.capacity

    @property
    def name(self) -> str:
        return self.seg.name

    def write(self, payload: bytes | bytearray | memoryview) -> None:
        """Appends one message; waits (up to `timeout`) while the ring is full, raising RingTimeout or PeerDied."""
        n = len(payload)
        if n <= self.max_fragment:  # the common case, inlined: one frame, no wrap, room known to be free
            need = (n + 11) & ~7
            head = self._head
            pos = head & (self._cap - 1)
            if self._cap - pos >= need and self._free >= need:
                at = self._base + pos
                m = self._map
                _pack_u32(m, at, n)
                m[at + 4 : at + 4 + n] = payload
                self._head = head = head + need
                self._free -= need
                _acquire()  # fence: the frame's bytes before the head that publishes them
                _release()
                words = self._words
                words[0] = head
                _acquire()  # fence: the head store before the sleeping flags are read
                _release()
                if self._single_flag:
                    if words[self._single_flag]:
                        self.seg.sems[0].release()
                else:
                    self._wake_sleeping(words)
                return
            self._put(payload, 0)
            self._wake_readers()
            return
        view = memoryview(payload).cast("B")
        off = 0
        while off < n:
            size = min(self.max_fragment, n - off)
            self._put(view[off : off + size], MORE if off + size < n else 0)
            off += size
        self._wake_readers()

    def try_write(self, payload: bytes | bytearray | memoryview, start: int = 0) -> int:
        """Writes what fits now of one message, from byte `start` on, and never waits; returns the byte reached
        (len(payload) once it is all written). A message of one frame goes whole or not at all; a larger one
        fragment by fragment, so that a later call goes on from where this one stopped. For writers that
        must not block (an event loop): they retry later instead of waiting on the ring."""
        view = memoryview(payload).cast("B")
        n, off = len(view), start
        while off < n:
            size = min(self.max_fragment, n - off)
            if not self._room_for(size):
                break
            self._put(view[off : off + size], MORE if off + size < n else 0)
            off += size
        if off > start:
            self._wake_readers()
        return off

    def write_reset(self) -> None:
        """Marks this writer's start in a ring another writer may have used (and died writing to): readers
        drop any message left half-written before it and call their `on_reset`."""
        self._put(b"", RESET)
        self._wake_readers()

    def reader_pid(self, i: int = 0) -> int:
        """The pid of the process that last opened reader `i` (0 before any did)."""
        return self.seg.words[_Segment.tail_index(i) + 2]

    def _room_for(self, size: int) -> bool:
        """Whether a frame of `size` payload bytes (and the wrap padding before it) fits now."""
        need = (size + 11) & ~7
        pos = self._head & (self._cap - 1)
        need += self._cap - pos if self._cap - pos < need else 0
        if self._free < need:
            self._free = self._cap - (self._head - self._min_tail())
        return self._free >= need

    def _put(self, chunk, flag: int) -> None:
        cap, n = self._cap, len(chunk)
        need = (n + 11) & ~7  # 4-byte word + payload, padded to 8
        pos = self._head & (cap - 1)
        pad = cap - pos if cap - pos < need else 0
        if self._free < need + pad:
            self._wait_space(need + pad)
            self._free = cap - (self._head - self._min_tail())
        at = self._base + pos
        if pad:  # unpublished bytes: no reader looks at them until the head moves
            _U32.pack_into(self._map, at, WRAP)
            self._head += pad
            at = self._base
        _U32.pack_into(self._map, at, n | flag)
        self._map[at + 4 : at + 4 + n] = chunk
        self._head += need
        self._free -= need + pad
        fence()
        self._words[0] = self._head

    def _min_tail(self) -> int:
        w = self.seg.words
        return min(w[_Segment.tail_index(i)] for i in range(self.seg.num_readers))

    def _wait_space(self, need: int) -> None:
        cap = self.seg.capacity
        if cap - (self._head - self._min_tail()) >= need:
            return
        self._wake_readers()
        deadline = time.monotonic() + self.timeout
        spins = 0
        while cap - (self._head - self._min_tail()) < need:
            spins += 1
            if spins < 1000:
                continue
            self.seg.words[_Segment.WRITER_WAITING] = 1
            fence()
            if cap - (self._head - self._min_tail()) >= need:
                break
            try:
                self.seg.space.acquire(0.05)
            except posix_ipc.BusyError:
                self._check_readers()  # no reader made room within 50 ms: is any still alive?
            if time.monotonic() > deadline:
                self.seg.words[_Segment.WRITER_WAITING] = 0
                raise RingTimeout(f"ring {self.name} stayed full for {self.timeout:.1f} s (reader too slow or stuck)")
        self.seg.words[_Segment.WRITER_WAITING] = 0

    def _check_readers(self) -> None:
        w = self.seg.words
        for i in range(self.seg.num_readers):
            pid = w[_Segment.tail_index(i) + 2]
            if pid and not pid_alive(pid):
                raise PeerDied(f"reader {i} (pid {pid}) of ring {self.name} has died")

    def _wake_readers(self) -> None:
        fence()  # the head store above must be visible before the flags are read
        self._wake_sleeping(self._words)

    def _wake_sleeping(self, w) -> None:
        for i, flag in enumerate(self._sleep_flags):
            if w[flag]:  # that reader said it sleeps
                self.seg.sems[i].release()

    def close(self, unlink: bool | None = None) -> None:
        if self.owner if unlink is None else unlink:
            self.seg.unlink()
        self.seg.close()


class RingReader:
    def __init__(
        self,
        name: str,
        index: int = 0,
        spin_seconds: float = 500e-6,
        create: bool = False,
        capacity: int = 1 << 20,
        num_readers: int = 1,
        from_head: bool = False,
    ):
        """`from_head`: skip what is in the ring now (frames a previous reader left unread)."""
        self.seg = _Segment(name, create, capacity, num_readers)
        if not 0 <= index < self.seg.num_readers:
            raise ValueError(f"reader index {index} outside the ring's {self.seg.num_readers} readers")
        self.owner = create
        self.index = index
        self.spin_seconds = spin_seconds
        self._ti = _Segment.tail_index(index)
        self.seg.words[self._ti + 2] = os.getpid()
        if from_head:
            self.seg.words[self._ti] = self.seg.words[_Segment.HEAD]
        self._tail = self.seg.words[self._ti]
        self._partial: bytearray | None = None
        self.on_reset: Callable[[], None] | None = None  # called where a new writer took over, from poll()

    @property
    def name(self) -> str:
        return self.seg.name

    def poll(self, handle, limit: int = 1 << 30) -> int:
        """Calls `handle(memoryview)` for each complete message available now, straight from shared memory
        (copy it if it must outlive the call). Returns how many. Never blocks."""
        seg, cap = self.seg, self.seg.capacity
        head = seg.words[_Segment.HEAD]
        if head == self._tail:
            return 0
        fence()
        count, raw, base, data, mask = 0, seg.map, seg.data_start, seg.data, cap - 1
        tail = self._tail
        try:
            while tail < head and count < limit:
                pos = tail & mask
                if cap - pos < 4:
                    tail += cap - pos
                    continue
                word = _unpack_u32(raw, base + pos)[0]
                if word == WRAP:
                    tail += cap - pos
                    continue
                if word == RESET:
                    self._partial = None
                    tail += 8
                    if self.on_reset is not None:
                        self.on_reset()
                    continue
                n = word & ~MORE
                need = (n + 11) & ~7
                if pos + need > cap or tail + need > head:
                    raise RingCorrupted(
                        f"ring {self.name}: frame of {n} bytes at offset {pos} overruns the data "
                        f"(capacity {cap}, {head - tail} bytes published)"
                    )
                if word & MORE or self._partial is not None:
                    count += self._add_fragment(data[pos + 4 : pos + 4 + n], word & MORE, handle)
                else:
                    handle(data[pos + 4 : pos + 4 + n])
                    count += 1
                tail += need
        finally:  # a handler that raises still consumes the frames before it
            self._tail = tail
        fence()
        seg.words[self._ti] = tail
        if count and seg.words[_Segment.WRITER_WAITING]:
            seg.space.release()
        return count

    def _add_fragment(self, body: memoryview, more: int, handle) -> int:
        """Appends one fragment of a split message; hands the message over once its last one arrives."""
        if self._partial is None:
            self._partial = bytearray()
        self._partial += body
        if more:
            return 0
        message, self._partial = self._partial, None
        handle(memoryview(message))
        return 1

    def wait(self, timeout: float | None = None) -> bool:
        """Blocks until data is available: spins for `spin_seconds`, then sleeps on the semaphore. Returns
        False on timeout; raises PeerDied if the writer has gone."""
        w = self.seg.words
        if w[_Segment.HEAD] != self._tail:
            return True
        end_spin = time.perf_counter() + self.spin_seconds
        while time.perf_counter() < end_spin:
            if w[_Segment.HEAD] != self._tail:
                return True
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            w[self._ti + 1] = 1
            fence()
            while w[_Segment.HEAD] == self._tail:
                slice_ = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                try:
                    self.seg.sems[self.index].acquire(slice_)
                except posix_ipc.BusyError:
                    pid = w[_Segment.WRITER_PID]
                    if pid and not pid_alive(pid):
                        raise PeerDied(f"writer (pid {pid}) of ring {self.name} has died") from None
                    if deadline is not None and time.monotonic() >= deadline:
                        return False
        finally:
            w[self._ti + 1] = 0
        return True

    def close(self, unlink: bool | None = None) -> None:
        if self.owner if unlink is None else unlink:
            self.seg.unlink()
        self.seg.close()
