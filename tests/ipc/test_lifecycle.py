"""Segment lifecycle (ipc/lifecycle.py): segment names that stay apart across pid namespaces and reused pids,
the stale sweep (dead and zombie owners, multiprocessing semaphores of killed holders), and API workers'
claims of ring pairs under contention and after a worker's death."""

import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import posix_ipc
import pytest

from ringllm.ipc import lifecycle
from ringllm.ipc.lifecycle import (
    claim_worker_index,
    create_pair_claims,
    leftover_segments,
    remove_stale_segments,
    segment_name,
)
from ringllm.ipc.ring import RingWriter

CTX = mp.get_context("fork")


def test_stale_segments_of_dead_owner_are_removed():
    proc = CTX.Process(target=lambda: None)
    proc.start()
    proc.join()
    dead = proc.pid
    w = RingWriter(segment_name(dead, "req0"), capacity=4096)
    w.seg.close()  # leave it behind, as a SIGKILLed owner would
    assert leftover_segments(dead)
    remove_stale_segments()  # (an engine starting in a parallel test process may sweep it first: same result)
    assert leftover_segments(dead) == []


def _claim_rounds(owner, pairs, rounds, barrier, q):
    """Each round: every process claims at the same moment, reports its pair, then all release."""
    got = []
    for _ in range(rounds):
        barrier.wait()
        claim = claim_worker_index(owner, pairs, wait=0)
        got.append(claim.index)
        barrier.wait()
        claim.release()
    q.put(got)


def _claim_and_hold(owner, q):
    q.put(claim_worker_index(owner, 1).index)
    time.sleep(60)


@pytest.fixture
def claims():
    """Four pair claims of this process, removed afterwards."""
    create_pair_claims(os.getpid(), 4)
    yield os.getpid()
    for k in range(4):
        posix_ipc.unlink_shared_memory(segment_name(os.getpid(), f"claim{k}"))


def test_workers_claim_distinct_pairs_under_contention(claims):
    """4 processes × 300 rounds of claims at once: every round all four pairs, each exactly once (the old
    counter, read after its increment, once gave [0, 2, 2, 3] in 1,500 tries); a fifth claimant gets none."""
    rounds, q, barrier = 300, CTX.Queue(), CTX.Barrier(4)
    procs = [CTX.Process(target=_claim_rounds, args=(claims, 4, rounds, barrier, q)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        results = [q.get(timeout=120) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
    assert all(sorted(r[i] for r in results) == [0, 1, 2, 3] for i in range(rounds))
    held = [claim_worker_index(claims, 4) for _ in range(4)]
    with pytest.raises(RuntimeError, match="no ring pair left"):
        claim_worker_index(claims, 4, wait=0.2)
    for c in held:
        c.release()


def test_a_killed_workers_pair_is_free_again(claims):
    q = CTX.Queue()
    holder = CTX.Process(target=_claim_and_hold, args=(claims, q))
    holder.start()
    assert q.get(timeout=20) == 0
    with pytest.raises(RuntimeError, match="no ring pair left"):
        claim_worker_index(claims, 1, wait=0)
    os.kill(holder.pid, signal.SIGKILL)
    holder.join(10)
    claim = claim_worker_index(claims, 1, wait=5)  # the kernel dropped the dead holder's lock
    assert claim.index == 0
    claim.release()


ROOT = Path(__file__).resolve().parents[2]


# ---- segment names and the stale sweep ----
def _can_unshare() -> bool:
    if shutil.which("unshare") is None:
        return False
    run = subprocess.run(
        ["unshare", "--user", "--map-root-user", "--pid", "--fork", "--mount-proc", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    return run.returncode == 0


OWNER = """
import os, sys, time
sys.path.insert(0, {root!r})
from ringllm.ipc.lifecycle import RingPair
pair = RingPair(os.getpid(), 0, capacity=4096)
print(os.getpid(), pair.requests.name, flush=True)
time.sleep(120)
"""


@pytest.mark.skipif(not _can_unshare(), reason="no unprivileged pid namespaces here (unshare)")
def test_engines_with_one_pid_in_two_pid_namespaces_do_not_collide_and_are_swept_once_dead():
    """Two owners that are both pid 1 of their own pid namespace, sharing /dev/shm (as two containers with
    --ipc=host): both create their rings; a sweep from outside leaves the live ones alone and removes them once
    their owners are killed."""
    before = set(leftover_segments())
    cmd = [
        "unshare",
        "--user",
        "--map-root-user",
        "--pid",
        "--fork",
        "--mount-proc",
        sys.executable,
        "-c",
        OWNER.format(root=str(ROOT)),
    ]
    procs = [
        subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        for _ in range(2)
    ]
    try:
        lines = [p.stdout.readline().split() for p in procs]
        assert all(line and line[0] == "1" for line in lines), (lines, [p.stderr.read() for p in procs if p.poll()])
        assert lines[0][1] != lines[1][1]  # same pid, different names
        # theirs: the two owners' names only (a parallel test process may be making segments of its own)
        owners = tuple(line[1].lstrip("/").rsplit("-", 1)[0] + "-" for line in lines)
        theirs = {s for s in set(leftover_segments()) - before if any(o in s for o in owners)}  # sem.<name> too
        assert len(theirs) >= 2 * 6  # two ring pairs (segments, semaphores) and two lock files
        assert not theirs & set(remove_stale_segments())  # alive in another namespace: kept
        assert theirs <= set(leftover_segments())
    finally:
        for p in procs:
            os.killpg(p.pid, signal.SIGKILL)  # nobody cleans up
            p.wait(30)
    # unshare can be reaped before its child (pid 1 inside) has finished exiting and let go of its lock file, so
    # the sweep is retried until the owners are truly gone; a live owner's segments would never be removed.
    removed: set[str] = set()
    deadline = time.monotonic() + 30
    while not theirs <= removed and time.monotonic() < deadline:
        removed |= set(remove_stale_segments())
        time.sleep(0.1)
    assert theirs <= removed
    assert not theirs & set(leftover_segments())


def test_a_reused_pid_does_not_inherit_a_dead_owners_segments():
    """A segment named for this pid but another start time belongs to an earlier process with the same pid:
    stale, swept; this process's own segments are kept."""
    me = os.getpid()
    ns = lifecycle._pid_namespace()
    earlier = f"/{lifecycle.PREFIX}-{me}-1-{ns}-req0"
    shm = posix_ipc.SharedMemory(earlier, posix_ipc.O_CREX, size=4096)
    shm.close_fd()
    mine = posix_ipc.SharedMemory(lifecycle.segment_name(me, "h2keep"), posix_ipc.O_CREX, size=4096)
    mine.close_fd()
    try:
        removed = remove_stale_segments()
        assert earlier.lstrip("/") in removed
        assert mine.name.lstrip("/") not in removed and mine.name.lstrip("/") in leftover_segments(me)
    finally:
        mine.unlink()


def test_a_zombie_owners_segments_are_swept():
    """After kill -9 of a whole group the engine's new parent may not have reaped it yet: a zombie has exited
    and closed everything, so a restarting server must sweep its segments (this raced in CI before)."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    name = lifecycle.segment_name(child.pid, "h2zombie")
    try:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, size=4096)
        shm.close_fd()
        assert name.lstrip("/") not in remove_stale_segments()  # alive: kept
        os.kill(child.pid, signal.SIGKILL)
        for _ in range(200):  # until the kernel has made it a zombie (not reaped: no wait() yet)
            with open(f"/proc/{child.pid}/stat", "rb") as f:
                if f.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
            time.sleep(0.05)
        remove_stale_segments()  # (or a sweep by an engine starting in a parallel test process)
        assert name.lstrip("/") not in leftover_segments()
    finally:
        child.kill()
        child.wait(30)
        if name.lstrip("/") in leftover_segments():
            posix_ipc.unlink_shared_memory(name)


HOLDER = """
import sys, time, posix_ipc
sem = posix_ipc.Semaphore(sys.argv[1], posix_ipc.O_CREX, initial_value=1)
print("ready", flush=True)
time.sleep(120)
"""


def test_sweep_removes_multiprocessing_semaphores_whose_holders_were_killed():
    """sem.mp-* files of processes killed with -9 (resource tracker and all) are removed; one that a live
    process still holds is kept, however old."""
    names = [f"/mp-h2{os.getpid()}{tag}" for tag in ("dead", "live")]
    procs = [
        subprocess.Popen([sys.executable, "-c", HOLDER, name], stdout=subprocess.PIPE, text=True) for name in names
    ]
    try:
        assert [p.stdout.readline().strip() for p in procs] == ["ready", "ready"]
        procs[0].kill()
        procs[0].wait(10)
        old = time.time() - 2 * lifecycle.MP_SEMAPHORE_MIN_AGE_S
        for name in names:
            os.utime(f"/dev/shm/sem.{name[1:]}", (old, old))
        remove_stale_segments()  # (an engine starting in a parallel test process may sweep first: same result)
        assert not os.path.exists(f"/dev/shm/sem.{names[0][1:]}")
        assert os.path.exists(f"/dev/shm/sem.{names[1][1:]}")
    finally:
        procs[1].kill()
        procs[1].wait(10)
        for name in names:
            try:
                posix_ipc.unlink_semaphore(name)
            except posix_ipc.ExistentialError:
                pass
