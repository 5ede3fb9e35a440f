"""Names, ownership and clean-up of ring segments.

Every name carries the owner's pid and a role: /ringllm-<pid>-<role>. The owner unlinks its segments at exit
(atexit, and on SIGTERM through the handler installed here); a new owner removes the segments of owners
that are no longer alive. App workers find their ring pair through a claim counter: worker k of the
engine with pid P takes pair k, named /ringllm-P-req<k> and /ringllm-P-out<k>, and row k of the metrics
table /ringllm-P-metrics."""

from __future__ import annotations

import atexit
import os
import re
import signal

import posix_ipc

from ipc.ring import RingReader, RingWriter, pid_alive
from ipc.shared_table import SharedTable

PREFIX = "ringllm"
_SHM_DIR = "/dev/shm"
_owned: list = []


def segment_name(owner_pid: int, role: str) -> str:
    return f"/{PREFIX}-{owner_pid}-{role}"


def remove_stale_segments() -> list[str]:
    """Unlinks segments and semaphores whose owner pid is dead. Returns their names."""
    removed = []
    pattern = re.compile(rf"^(sem\.)?{PREFIX}-(\d+)-")
    try:
        entries = os.listdir(_SHM_DIR)
    except FileNotFoundError:
        return removed
    for entry in entries:
        m = pattern.match(entry)
        if not m or pid_alive(int(m.group(2))):
            continue
        try:
            if m.group(1):
                posix_ipc.unlink_semaphore("/" + entry[len("sem."):])
            else:
                posix_ipc.unlink_shared_memory("/" + entry)
            removed.append(entry)
        except posix_ipc.ExistentialError:
            continue  # another process removed it first
    return removed


def leftover_segments(owner_pid: int | None = None) -> list[str]:
    """Segments and semaphores of ours still in /dev/shm (of one owner, if given)."""
    tag = f"{PREFIX}-{owner_pid}-" if owner_pid else f"{PREFIX}-"
    try:
        return sorted(e for e in os.listdir(_SHM_DIR) if e.startswith(tag) or e.startswith("sem." + tag))
    except FileNotFoundError:
        return []


def own(ring) -> None:
    """Registers a ring this process created, to be unlinked at exit or SIGTERM."""
    if not _owned:
        atexit.register(cleanup)
        _chain_sigterm()
    _owned.append(ring)


def cleanup() -> None:
    while _owned:
        ring = _owned.pop()
        try:
            ring.close(unlink=True)
        except Exception:  # already gone: nothing to clean
            continue


def _chain_sigterm() -> None:
    previous = signal.getsignal(signal.SIGTERM)
    if previous not in (signal.SIG_DFL, None) and previous is not signal.SIG_IGN:
        return  # someone else handles SIGTERM; atexit still runs when they exit

    def handler(signum, frame):
        cleanup()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)

    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:
        pass  # not the main thread


class RingPair:
    """The engine's end of one app worker's pair: it reads requests and writes outputs."""

    def __init__(self, owner_pid: int, index: int, capacity: int = 1 << 22):
        self.requests = RingReader(segment_name(owner_pid, f"req{index}"), create=True, capacity=capacity)
        self.outputs = RingWriter(segment_name(owner_pid, f"out{index}"), capacity=capacity)
        own(self.requests)
        own(self.outputs)


class WorkerPair:
    """An app worker's end: it writes requests and reads outputs."""

    def __init__(self, owner_pid: int, index: int):
        self.requests = RingWriter(segment_name(owner_pid, f"req{index}"), create=False)
        self.outputs = RingReader(segment_name(owner_pid, f"out{index}"))


def create_metrics_table(owner_pid: int, num_workers: int) -> None:
    """The shared table in which app worker k keeps its request metrics in row k."""
    own(SharedTable(segment_name(owner_pid, "metrics"), num_workers, create=True))


def open_metrics_table(owner_pid: int) -> SharedTable:
    return SharedTable(segment_name(owner_pid, "metrics"))


def create_claim_counter(owner_pid: int) -> None:
    sem = posix_ipc.Semaphore(segment_name(owner_pid, "claim"), posix_ipc.O_CREX, initial_value=0)
    own(_SemaphoreHandle(sem))


def claim_worker_index(owner_pid: int, num_pairs: int) -> int:
    """Each call, from any process, returns the next unused pair index (0, 1, ...): a semaphore's value is
    the count of claims so far, and incrementing it is atomic."""
    sem = posix_ipc.Semaphore(segment_name(owner_pid, "claim"))
    try:
        sem.release()
        index = sem.value - 1
    finally:
        sem.close()
    if index >= num_pairs:
        raise RuntimeError(f"no ring pair left: {num_pairs} were made for {num_pairs} workers")
    return index


class _SemaphoreHandle:
    def __init__(self, sem):
        self.sem = sem

    def close(self, unlink: bool = True) -> None:
        if unlink:
            self.sem.unlink()
        self.sem.close()
