"""Ring vs pyzmq ipc:// (PUSH/PULL), measured in the same run: round-trip latency p50/p99 and one-way
messages per second, for ~200-byte and ~8 KB frames.

    python scripts/bench_ipc.py [--round-trips 20000] [--messages 200000]"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ringllm.ipc.lifecycle import segment_name
from ringllm.ipc.ring import RingReader, RingWriter

CTX = mp.get_context("fork")


def _pct(values, q):
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


# ---- ring ----
def _ring_echo(req, resp, n):
    r, w = RingReader(req), RingWriter(resp, create=False)
    frames = []
    done = 0
    while done < n:
        r.wait()
        frames.clear()
        r.poll(lambda v: frames.append(bytes(v)))
        for f in frames:
            w.write(f)
        done += len(frames)


def ring_round_trip(size, n):
    req, resp = segment_name(os.getpid(), f"b{size}q"), segment_name(os.getpid(), f"b{size}p")
    w = RingWriter(req, capacity=1 << 20)
    r = RingReader(resp, create=True, capacity=1 << 20)
    p = CTX.Process(target=_ring_echo, args=(req, resp, n))
    p.start()
    payload, lat = b"x" * size, []
    for _ in range(n):
        t = time.perf_counter()
        w.write(payload)
        got = 0
        while not got:
            r.wait()
            got = r.poll(lambda v: None)
        lat.append(time.perf_counter() - t)
    p.join()
    w.close(), r.close()
    return lat


def _ring_sink(name, n, q):
    r = RingReader(name)
    count, t0 = 0, None
    while count < n:
        r.wait()
        count += r.poll(lambda v: None)
        t0 = t0 or time.perf_counter()
    q.put(time.perf_counter())


def ring_one_way(size, n):
    name = segment_name(os.getpid(), f"o{size}")
    w = RingWriter(name, capacity=1 << 22)
    q = CTX.Queue()
    p = CTX.Process(target=_ring_sink, args=(name, n, q))
    p.start()
    time.sleep(0.2)
    payload = b"x" * size
    t0 = time.perf_counter()
    for _ in range(n):
        w.write(payload)
    end = q.get()
    p.join()
    w.close()
    return n / (end - t0)


# ---- pyzmq ----
def _zmq_echo(a, b, n):
    import zmq

    ctx = zmq.Context()
    pull, push = ctx.socket(zmq.PULL), ctx.socket(zmq.PUSH)
    pull.connect(a)
    push.connect(b)
    for _ in range(n):
        push.send(pull.recv(copy=False), copy=False)


def zmq_round_trip(size, n, tmp):
    import zmq

    a, b = f"ipc://{tmp}/a{size}", f"ipc://{tmp}/b{size}"
    ctx = zmq.Context()
    push, pull = ctx.socket(zmq.PUSH), ctx.socket(zmq.PULL)
    push.bind(a)
    pull.bind(b)
    p = CTX.Process(target=_zmq_echo, args=(a, b, n))
    p.start()
    payload, lat = b"x" * size, []
    for _ in range(n):
        t = time.perf_counter()
        push.send(payload, copy=False)
        pull.recv(copy=False)
        lat.append(time.perf_counter() - t)
    p.join()
    ctx.destroy(linger=0)
    return lat


def _zmq_sink(addr, n, q):
    import zmq

    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.connect(addr)
    for _ in range(n):
        pull.recv(copy=False)
    q.put(time.perf_counter())


def zmq_one_way(size, n, tmp):
    import zmq

    addr = f"ipc://{tmp}/o{size}"
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.setsockopt(zmq.SNDHWM, 0)
    push.bind(addr)
    q = CTX.Queue()
    p = CTX.Process(target=_zmq_sink, args=(addr, n, q))
    p.start()
    time.sleep(0.2)
    payload = b"x" * size
    t0 = time.perf_counter()
    for _ in range(n):
        push.send(payload, copy=False)
    end = q.get()
    p.join()
    ctx.destroy(linger=0)
    return n / (end - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--round-trips", type=int, default=20_000)
    ap.add_argument("--messages", type=int, default=200_000)
    a = ap.parse_args()
    tmp = tempfile.mkdtemp()
    rows = []
    for size in (200, 8192):
        rl = ring_round_trip(size, a.round_trips)
        zl = zmq_round_trip(size, a.round_trips, tmp)
        rt, zt = ring_one_way(size, a.messages), zmq_one_way(size, a.messages, tmp)
        rows.append((size, _pct(rl, 0.5), _pct(rl, 0.99), _pct(zl, 0.5), _pct(zl, 0.99), rt, zt))
    print(f"machine: {os.cpu_count()} cores; {a.round_trips} round trips, {a.messages} one-way messages")
    print(
        f"{'frame':>6} | {'ring p50':>9} {'ring p99':>9} | {'zmq p50':>9} {'zmq p99':>9} | {'p50 ratio':>9} | "
        f"{'ring msg/s':>11} {'zmq msg/s':>11} {'ratio':>6}"
    )
    for size, rp50, rp99, zp50, zp99, rt, zt in rows:
        print(
            f"{size:>6} | {rp50 * 1e6:>7.1f}us {rp99 * 1e6:>7.1f}us | {zp50 * 1e6:>7.1f}us {zp99 * 1e6:>7.1f}us | "
            f"{zp50 / rp50:>8.1f}x | {rt:>11,.0f} {zt:>11,.0f} {rt / zt:>5.2f}x"
        )


if __name__ == "__main__":
    main()
