"""Names, ownership and clean-up of ring segments.

Every name carries its owner and a role: /ringllm-<pid>-<start>-<pidns>-<role>, where <start> is the owner's
start time (clock ticks since boot, from /proc) and <pidns> the inode of its pid namespace. The pid alone is
not enough: two containers that share /dev/shm (--ipc=host) each have an engine with pid 4, and a pid is
reused once its process is gone. The owner unlinks its segments at exit (atexit, and on SIGTERM through the
handler installed here); a new owner removes the segments of owners that are no longer alive.

Liveness: an owner in this pid namespace is alive while a process with its pid and start time exists. An owner
in another namespace cannot be seen in /proc, so every owner also holds an flock on its lock file
/dev/shm/ringllm-<tag>-lock from before its first segment is made until it exits; the kernel drops the lock
when the process dies, even by SIGKILL, and a sweep in any namespace can test it.

App workers find their ring pair by claiming it: the worker that holds the flock on -claim<k> owns pair k,
named /ringllm-<tag of P>-req<k> and -out<k>, and row k of the metrics table -metrics. A worker that dies
drops its lock; the worker started in its place claims the pair and opens it with a reset (see WorkerPair)."""

from __future__ import annotations

import atexit
import fcntl
import os
import re
import signal
import time

import posix_ipc

from ringllm.ipc.ring import RingReader, RingWriter, pid_alive
from ringllm.ipc.shared_table import SharedTable

PREFIX = "ringllm"
_SHM_DIR = "/dev/shm"
_owned: list = []
_lock: dict = {}  # this process's lock file: {"fd": ..., "path": ..., "pid": ...}
_TAGGED = re.compile(rf"^(?:sem\.)?{PREFIX}-(\d+)-(\d+)-(\d+)-")
_LEGACY = re.compile(rf"^(?:sem\.)?{PREFIX}-(\d+)-(?!\d+-\d+-)")  # /ringllm-<pid>-<role> of older versions
MP_SEMAPHORE_MIN_AGE_S = 10.0  # a multiprocessing semaphore made this recently is never swept


def _start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if there is no such process. A zombie counts
    as gone: it has exited and closed everything, only its exit status waits to be read (after kill -9 of a whole
    group the engine's new parent may take its time to reap it)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return None if fields[0] in (b"Z", b"X") else int(fields[19])
    except (OSError, IndexError, ValueError):
        return None


def _pid_namespace() -> int:
    try:
        return os.stat("/proc/self/ns/pid").st_ino
    except OSError:
        return 0


def owner_tag(pid: int) -> str:
    """<pid>-<start>-<pidns> of a process in this pid namespace (start 0 if it is gone)."""
    return f"{pid}-{_start_time(pid) or 0}-{_pid_namespace()}"


def segment_name(owner_pid: int, role: str) -> str:
    """The name of `role`'s segment of the owner with pid `owner_pid` (in this pid namespace). Naming one's own
    segment takes the owner's lock first, so no segment of a live owner is ever unlocked."""
    if owner_pid == os.getpid():
        _hold_lock()
    return f"/{PREFIX}-{owner_tag(owner_pid)}-{role}"


def _lock_path(tag: str) -> str:
    return os.path.join(_SHM_DIR, f"{PREFIX}-{tag}-lock")


def _hold_lock() -> None:
    if _lock.get("pid") == os.getpid():
        return
    path = _lock_path(owner_tag(os.getpid()))
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)  # not inherited by children (O_CLOEXEC)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _lock.update(fd=fd, path=path, pid=os.getpid())
    atexit.register(cleanup)


def _locked(path: str) -> bool:
    """Whether a live process holds the lock file at `path`."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def _owner_alive(entry: str, own_ns: int) -> bool | None:
    """Whether the owner of /dev/shm entry `entry` lives; None for entries that are not ours."""
    m = _TAGGED.match(entry)
    if m:
        pid, start, ns = (int(g) for g in m.groups())
        if ns == own_ns:
            return _start_time(pid) == start
        return _locked(_lock_path(f"{pid}-{start}-{ns}"))
    m = _LEGACY.match(entry)
    if m:
        return pid_alive(int(m.group(1)))
    return None


def remove_stale_segments() -> list[str]:
    """Unlinks the segments, semaphores and lock files of owners that are no longer alive, and multiprocessing
    semaphores that nobody holds (see `unheld_mp_semaphores`). Returns their names."""
    removed: list[str] = []
    try:
        entries = os.listdir(_SHM_DIR)
    except FileNotFoundError:
        return removed
    own_ns = _pid_namespace()
    stale = [e for e in entries if _owner_alive(e, own_ns) is False]
    for entry in stale + unheld_mp_semaphores(entries):
        try:
            os.unlink(os.path.join(_SHM_DIR, entry))
            removed.append(entry)
        except FileNotFoundError:
            continue  # another process removed it first
    return removed


def unheld_mp_semaphores(entries: list[str] | None = None, min_age_s: float = MP_SEMAPHORE_MIN_AGE_S) -> list[str]:
    """multiprocessing's named semaphores (sem.mp-*) among `entries` (default: all of /dev/shm) that are ours (our
    uid), mapped by no process we can see and made at least `min_age_s` ago. A semaphore is mapped by every process that holds it open, so these
    are the ones whose holders were all killed (kill -9 of a whole process group, resource tracker included)
    and that nobody can open again by a name only those holders knew. Limit: a holder in another pid
    namespace that shares /dev/shm and runs as the same uid cannot be seen."""
    candidates = {}
    now = time.time()
    for entry in os.listdir(_SHM_DIR) if entries is None else entries:
        if not entry.startswith("sem.mp-"):
            continue
        try:
            st = os.stat(os.path.join(_SHM_DIR, entry))
        except FileNotFoundError:
            continue
        if st.st_uid == os.getuid() and now - st.st_mtime >= min_age_s:
            candidates[entry] = st.st_ino
    if not candidates:
        return []
    mapped = _mapped_shm_inodes()
    return [e for e, inode in candidates.items() if inode not in mapped]


def _mapped_shm_inodes() -> set[int]:
    """Inodes of /dev/shm files mapped by any process whose maps this one may read. By inode, not name: glibc
    maps a new semaphore under a temporary name before linking it to its own."""
    mapped = set()
    marker = (_SHM_DIR + "/").encode()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/maps", "rb") as f:
                for line in f:
                    if marker in line:
                        mapped.add(int(line.split()[4]))
        except (OSError, IndexError, ValueError):
            continue
    return mapped


def leftover_segments(owner_pid: int | None = None) -> list[str]:
    """Segments, semaphores and lock files of ours still in /dev/shm (of one owner pid, if given)."""
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
    if _lock.get("pid") == os.getpid():
        try:
            os.unlink(_lock["path"])
        except FileNotFoundError:
            pass
        os.close(_lock.pop("fd"))
        _lock.clear()


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
    """An app worker's end: it writes requests and reads outputs. The pair may have served a worker that
    died: the outputs it left unread are skipped, and the first request frame is a reset, which tells the
    engine to drop whatever the dead worker left half-written and to abort its requests."""

    def __init__(self, owner_pid: int, index: int):
        self.requests = RingWriter(segment_name(owner_pid, f"req{index}"), create=False)
        self.outputs = RingReader(segment_name(owner_pid, f"out{index}"), from_head=True)
        self.requests.write_reset()


def create_metrics_table(owner_pid: int, num_workers: int) -> None:
    """The shared table in which app worker k keeps its request metrics in row k."""
    own(SharedTable(segment_name(owner_pid, "metrics"), num_workers, create=True))


def open_metrics_table(owner_pid: int) -> SharedTable:
    return SharedTable(segment_name(owner_pid, "metrics"))


def create_pair_claims(owner_pid: int, num_pairs: int) -> None:
    """One empty segment per ring pair, /ringllm-P-claim<k>: the worker holding an exclusive flock on it owns
    pair k. The kernel drops a dead process's locks, so a killed worker's pair is free again at once."""
    for k in range(num_pairs):
        own(_ClaimSegment(posix_ipc.SharedMemory(segment_name(owner_pid, f"claim{k}"), posix_ipc.O_CREX)))


class PairClaim:
    """Pair `index`, held by this process until release() (or its exit)."""

    def __init__(self, index: int, shm: posix_ipc.SharedMemory):
        self.index, self._shm = index, shm

    def release(self) -> None:
        if self._shm.fd >= 0:
            self._shm.close_fd()  # closing the descriptor drops the lock


def claim_worker_index(owner_pid: int, num_pairs: int, wait: float = 5.0) -> PairClaim:
    """Claims the lowest free ring pair of the engine `owner_pid` and holds it: a non-blocking flock is one
    atomic test-and-set, so two processes never get the same pair. Waits up to `wait` seconds for one to
    come free (a worker that was just killed), then raises RuntimeError."""
    deadline = time.monotonic() + wait
    while True:
        for k in range(num_pairs):
            shm = posix_ipc.SharedMemory(segment_name(owner_pid, f"claim{k}"))
            try:
                fcntl.flock(shm.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return PairClaim(k, shm)
            except BlockingIOError:
                shm.close_fd()
        if time.monotonic() > deadline:
            raise RuntimeError(f"no ring pair left: all {num_pairs} are held by live API workers")
        time.sleep(0.05)


class _ClaimSegment:
    def __init__(self, shm):
        self.shm = shm
        shm.close_fd()

    def close(self, unlink: bool = True) -> None:
        if unlink:
            self.shm.unlink()
