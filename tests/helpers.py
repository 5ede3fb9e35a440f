"""Tiny random-weight Hugging Face checkpoints and a loop that runs an Engine to completion."""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

FAMILIES = {
    "qwen3": dict(architectures=["Qwen3ForCausalLM"], model_type="qwen3"),
    "qwen2": dict(architectures=["Qwen2ForCausalLM"], model_type="qwen2"),
    "llama": dict(
        architectures=["LlamaForCausalLM"],
        model_type="llama",
        rope_scaling=dict(
            rope_type="llama3",
            factor=8.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=64,
        ),
        rope_theta=500000.0,
    ),
}


def tiny_checkpoint(
    family: str,
    out: Path,
    vocab: int = 256,
    tie: bool = False,
    seed: int = 0,
    head_dim: int = 16,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Saves a random-weight model of `family` with transformers' own classes, in float32."""
    from transformers import AutoConfig, AutoModelForCausalLM

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    cfg = AutoConfig.for_model(
        model_type,
        vocab_size=vocab,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=head_dim,
        max_position_embeddings=512,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-6,
        **spec,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():  # norms at 1 and biases at 0 would hide mistakes in how they are applied
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model.to(dtype).save_pretrained(out)
    return out


def hf_greedy(path: Path, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    outs = []
    for p in prompts:
        ids = torch.tensor([p])
        with torch.no_grad():
            gen = model.generate(
                ids,
                attention_mask=torch.ones_like(ids),
                max_new_tokens=max_new_tokens,
                min_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=None,
                pad_token_id=0,
            )
        outs.append(gen[0, len(p) :].tolist())
    return outs


def run_engine(engine, prompts: list[list[int]], params, rid_prefix: str = "r") -> list[list[int]]:
    """Adds every prompt, steps until all finish, returns the generated ids in prompt order."""
    rids = [f"{rid_prefix}{i}" for i in range(len(prompts))]
    out = {rid: [] for rid in rids}
    for rid, p in zip(rids, prompts):
        engine.add_request(rid, p, params)
    steps = 0
    while engine.has_work:
        for o in engine.step():
            if o.token_id is not None:
                out[o.rid].append(o.token_id)
        steps += 1
        assert steps < 10_000, "engine did not finish"
    return [out[r] for r in rids]


def make_sampler(max_rows: int, vocab: int, seed: int = 0, context: int = 16, eos=(), device="cpu"):
    """A Sampler over its own row table and request-token table ([max_rows, context]), as the runner builds it."""
    from ringllm.engine.sampler import RowTable, Sampler

    device = torch.device(device)
    req_tokens = torch.zeros(max_rows, context, dtype=torch.int32, device=device)
    return Sampler(RowTable(max_rows, device), vocab, seed, req_tokens, eos)


def sample_through_sink(sampler, logits, rows, seq_lens, mask=None, keep=None, index_dtype=np.int64):
    """One call of `sampler` as the runner makes it: batch entry b is request row rows[b] with seq_lens[b] known
    tokens once the step is computed; the tokens go through a ResultSink (with logprobs as wide as the rows ask)
    and come back as the engine reads them (a HostSample). Kept rows (all by default) land in req_tokens.
    `index_dtype`: of the device's rows and seq_lens (int32 on a CUDA decode step, int64 otherwise)."""
    from ringllm.engine.parallel import Layout
    from ringllm.engine.runner.inputs import StepIndices
    from ringllm.engine.runner.result_sink import StepResults

    device = sampler.device
    rows_host, lens_host = np.asarray(rows, dtype=np.int64), np.asarray(seq_lens, dtype=np.int64)
    B = len(rows_host)
    flags = np.ones(B, dtype=bool) if keep is None else np.asarray(keep, dtype=bool)
    t = lambda a, dtype=np.int64: torch.from_numpy(np.asarray(a, dtype=dtype)).to(device)
    ix = StepIndices(
        t(rows_host, index_dtype), t(lens_host - 1), None, t(lens_host, index_dtype), t(np.flatnonzero(flags)), t(flags)
    )
    results = StepResults(sampler.req_tokens, Layout(), len(sampler.req_tokens))
    sink = results.sink(ix, sampler.table.logprobs_width(rows_host), None)
    sampler(logits.to(device), rows_host, ix.rows, lens_host, ix.seq_lens, mask, sink)
    result = sink.close()
    assert result is not None  # rank 0 of one
    return result.wait()


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj))


# ---- `ringllm serve` on loopback ----
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_started: list[subprocess.Popen] = []  # every server a test started; none outlives the test session


def start_server(cache_dir, *args, env: dict | None = None) -> tuple[subprocess.Popen, str]:
    """Starts `ringllm serve` on the demo model on a free loopback port, in a process group of its own (its
    engine, GPU workers and API workers are in it too); returns once /health answers 200. Use `serving` (or
    stop_server in a fixture's teardown) so that the group is killed even when the test fails."""
    port = free_port()
    env = {**os.environ, "RINGLLM_CACHE": str(cache_dir), **(env or {})}  # `env` may name another cache
    if env.get("TESTS_ONE_TORCH_THREAD") and any(str(a).endswith(".gguf") for a in args):
        # The real model's server keeps torch's own thread count (conftest.py gives the rest one thread): its
        # large matmuls use both cores, and its greedy tokens are the ones the compat tests were written
        # against (one thread sums in another order, and a long-prompt test got another last token).
        env.pop("OMP_NUM_THREADS", None)
    log = open(os.path.join(cache_dir, "serve.log"), "wb")  # a file, not a pipe: a full pipe would stall it
    proc = subprocess.Popen(
        [sys.executable, "-m", "ringllm", "serve", "--port", str(port), "--device", "cpu", *args],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=_die_with_test,
    )
    _started.append(proc)
    base = f"http://127.0.0.1:{port}"
    # With --uds the server listens on that socket only: its health is asked there.
    uds = args[list(args).index("--uds") + 1] if "--uds" in args else None
    probe = httpx.Client(transport=httpx.HTTPTransport(uds=uds)) if uds else httpx
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        try:
            if probe.get(("http://localhost" if uds else base) + "/health", timeout=5).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.5)
        if proc.poll() is not None:
            kill_group(proc)
            pytest.fail("server exited during start-up:\n" + open(log.name, "rb").read().decode()[-3000:])
    kill_group(proc)
    pytest.fail("server did not start")


_prctl = ctypes.CDLL(None).prctl  # looked up here: the child of a fork must not load anything


def _die_with_test() -> None:
    """In the server's process before it runs: SIGKILL when the test process dies, even by kill -9 or the OOM
    killer (its engine and workers then follow it, ipc/process.py), so no test leaves a server behind. Only a
    system call, as code between fork and exec must be."""
    _prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG


START_SECONDS = 300  # a bound for a stuck start-up, far past a start on a busy 2-core machine


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int:
    """SIGTERM to the server's whole group, then SIGKILL to whatever is left of it; returns the exit status."""
    try:
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    try:
        return proc.wait(timeout)
    except subprocess.TimeoutExpired:
        raise AssertionError(f"server {proc.pid} did not stop within {timeout} s of SIGTERM") from None
    finally:
        kill_group(proc)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to every process left in the server's group, and reap the server."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        pass


@contextlib.contextmanager
def serving(cache_dir, *args, env: dict | None = None):
    """start_server for the length of a `with` block: the server's group is killed at its end, whatever
    happened in it (a server the block stopped itself is only reaped)."""
    proc, base = start_server(cache_dir, *args, env=env)
    try:
        yield proc, base
    finally:
        kill_group(proc)


@atexit.register
def _kill_leftover_servers() -> None:
    for proc in _started:
        if proc.poll() is None:
            kill_group(proc)


def engine_pid(proc: subprocess.Popen, seconds: float = 60) -> int:
    """The pid of this server's engine: the process of its tree that owns ring segments (its name is in theirs).
    Found from the server's own pid, so another server starting on the machine at the same time is never
    taken for this one."""
    from ringllm.ipc.lifecycle import leftover_segments

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for pid in process_tree(proc.pid):
            if pid != proc.pid and any(s.endswith("-req0") for s in leftover_segments(pid)):
                return pid
        time.sleep(0.1)
    raise AssertionError(f"no engine with rings under server {proc.pid}")


def tokens_per_second(base: str, tokens: int = 64, headers: dict | None = None) -> float:
    """This machine's rate for one request now, measured on the server under test: `tokens` over the whole
    request's time. Not from the gaps between streamed chunks: on a loaded machine a descheduled API worker or
    client sees a burst of chunks at once, and a rate read from their arrival came out tens of times too high
    (a test sized from it then asked for minutes of decoding and ran into its timeouts)."""
    body = {"prompt": "rate", "max_tokens": tokens, "ignore_eos": True}
    t = time.monotonic()
    r = httpx.post(base + "/v1/completions", json=body, timeout=300, headers=headers)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == tokens, r.text
    return tokens / max(time.monotonic() - t, 1e-3)


def server_segments(pid: int) -> set[str]:
    """The /dev/shm entries of the engine with this pid (rings, semaphores, lock file, tables)."""
    from ringllm.ipc.lifecycle import leftover_segments

    return set(leftover_segments(pid))


def metric(server, name, headers=None):
    text = httpx.get(server + "/metrics", timeout=60, headers=headers).text
    for line in text.splitlines():
        if line.startswith((name + " ", name + "{")):  # with labels (model_name), the first series
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def wait_for_metric(server, name, value, seconds=60.0, headers=None) -> float:
    """Polls /metrics until `name` reads `value` or `seconds` pass; returns the last reading."""
    deadline = time.monotonic() + seconds
    while (got := metric(server, name, headers)) != value and time.monotonic() < deadline:
        time.sleep(0.1)
    return got


def gone(what, seconds: float) -> bool:
    """Waits until `what()` is empty (processes reaped, segments removed) or `seconds` pass; True if it became
    so. The bound is for a stuck process only."""
    deadline = time.monotonic() + seconds
    while what() and time.monotonic() < deadline:
        time.sleep(0.1)
    return not what()


def cmdline(pid: int) -> bytes:
    """The command line of `pid` as /proc holds it (NUL-separated), or b"" once it is gone."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def api_workers(server_pid: int) -> list[int]:
    """Granian's API worker processes under a serve process: those forked from it, which run its own command line
    (the engine and multiprocessing's helpers are spawned, with other command lines)."""
    serve = cmdline(server_pid)
    return sorted(p for p in process_tree(server_pid)[1:] if cmdline(p) == serve)


def rss_mb(pids: list[int]) -> float:
    """The resident memory of these processes together, in MiB (one that is gone counts nothing)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            continue
    return total / 1024


async def probe_health(base: str, deadline: float, latencies: list[float], codes: dict) -> None:
    """GET /health every half second until `deadline` (time.monotonic()), each answer's seconds and status kept."""
    import asyncio

    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        while time.monotonic() < deadline:
            t = time.monotonic()
            r = await client.get("/health")
            latencies.append(time.monotonic() - t)
            codes[r.status_code] = codes.get(r.status_code, 0) + 1
            await asyncio.sleep(0.5)


def engine_pids(server_pid: int, count: int, seconds: float = 60) -> list[int]:
    """The `count` engine processes under a serve process, replica 0 first: those of its tree that own ring
    segments (their pid is in the names), ordered by when they started (the launcher starts replica r before
    r + 1; a pid can wrap around, a start time cannot)."""
    from ringllm.ipc.lifecycle import leftover_segments

    def started(pid: int) -> int:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])  # field 22, starttime, in clock ticks

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        found = [
            p
            for p in process_tree(server_pid)
            if p != server_pid and any(s.endswith("-req0") for s in leftover_segments(p))
        ]
        if len(found) == count:
            return sorted(found, key=lambda p: (started(p), p))
        time.sleep(0.1)
    raise AssertionError(f"the {count} engines have no rings")


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat", "rb") as f:
                    ppid = int(f.read().rsplit(b")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += children.get(p, [])
    return out


# ---- data parallelism: per-replica metrics ----
def per_replica(text: str, name: str) -> dict[int, float]:
    out = {}
    for line in text.splitlines():
        if line.startswith(name + "{"):
            out[int(line.split('replica="')[1].split('"')[0])] = float(line.rsplit(" ", 1)[1])
    return out


def scrape(base: str) -> str:
    return httpx.get(base + "/metrics", timeout=60).text


def wait_both_running(base: str) -> None:
    """Until each replica computes at least one request (bounded by a count of scrapes, not a deadline)."""
    for _ in range(3000):
        running = per_replica(scrape(base), "ringllm_dp_replica_num_requests_running")
        if running.get(0, 0) >= 1 and running.get(1, 0) >= 1:
            return
        time.sleep(0.05)
    raise AssertionError(f"the streams did not reach both replicas: {running}")


def unheld_mp_semaphores() -> set[str]:
    """multiprocessing's semaphores (sem.mp-*) that no live process holds, whatever their age: what a test's
    processes leave behind. Held ones may belong to a parallel test process (pytest-xdist) and are not counted."""
    from ringllm.ipc import lifecycle

    return set(lifecycle.unheld_mp_semaphores(min_age_s=0))
