"""Request-path defects (issues 12 and 19), each reproduced on the demo model over loopback: stop strings and
the engine, ring backpressure, API worker death, hostile bodies, usage, BOS, /tokenize, auth and /schema,
worker-pair claims, limits on n and seeds, big prompts, Content-Type."""

import concurrent.futures
import json
import os
import shutil
import signal
import threading
import time

import httpx
import pytest

from ringllm.ipc.lifecycle import leftover_segments
from tests.helpers import metric, process_tree, start_server, stop_server, wait_for_metric

RUNNING = "ringllm_num_requests_running"
GENERATED = "ringllm_generation_tokens_total"
MAX_WAITING = 600


def _bos_checkpoint(demo_path, out):
    """The demo checkpoint with a tokenizer that adds a BOS token (<|endoftext|>) to text, as Llama's do."""
    shutil.copytree(demo_path, out)
    tj = json.loads((out / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<|endoftext|>")
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [
            {"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}},
            {"Sequence": {"id": "A", "type_id": 0}},
            {"Sequence": {"id": "B", "type_id": 1}},
        ],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos_id], "tokens": ["<|endoftext|>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, bos_token="<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out, bos_id


@pytest.fixture(scope="module")
def bos_model(demo_path, tmp_path_factory):
    return _bos_checkpoint(demo_path, tmp_path_factory.mktemp("bos") / "demo-bos")


@pytest.fixture(scope="module")
def served(tmp_path_factory, bos_model):
    """One API worker (so that /health shares the event loop of the request under test), a context long
    enough for 4,000-token prompts, and a queue bound the fan-out tests can exceed. Yields (process, url)."""
    cache = tmp_path_factory.mktemp("defects")
    proc, base = start_server(
        cache,
        "--model",
        str(bos_model[0]),
        "--served-model-name",
        "demo",
        "--kv-cache-tokens",
        "16384",
        "--context-len",
        "4096",
        "--max-waiting-requests",
        str(MAX_WAITING),
    )
    yield proc, base
    stop_server(proc)


@pytest.fixture
def server(served):
    return served[1]


def _engine_pid(proc) -> int:
    """The engine of this test's server: the process under it that owns ring segments."""
    owners = [p for p in process_tree(proc.pid) if leftover_segments(p)]
    assert len(owners) == 1, owners
    return owners[0]


def _answers_while(base, busy) -> tuple[list[float], float, float]:
    """Polls /health while `busy()` runs; returns the times of the answers, the start and the end."""
    answers, done = [], threading.Event()

    def poll():
        while not done.is_set():
            assert httpx.get(base + "/health", timeout=120).status_code in (200, 503)
            answers.append(time.monotonic())

    poller = threading.Thread(target=poll)
    start = time.monotonic()
    poller.start()
    try:
        busy()
    finally:
        end = time.monotonic()
        done.set()
        poller.join()
    return [t for t in answers if start <= t <= end], start, end


def _longest_gap(times, start, end) -> float:
    return max(b - a for a, b in zip([start, *times], [*times, end]))


def _complete(base, timeout=60, **body):
    return httpx.post(base + "/v1/completions", json=body, timeout=timeout)


# ---- issue 12.1 ----
def test_a_stop_string_ends_the_request_in_the_engine(server):
    body = dict(prompt="The sea is", temperature=0, ignore_eos=True)
    full = _complete(server, max_tokens=16, **body).json()["choices"][0]["text"]
    stop = full[4:6]
    assert len(stop) == 2, full
    wait_for_metric(server, RUNNING, 0, 30)
    before = metric(server, GENERATED)
    r = _complete(server, max_tokens=300, stop=[stop], **body).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == full[: full.find(stop)]
    assert wait_for_metric(server, RUNNING, 0, 120) == 0
    assert metric(server, GENERATED) - before < 100  # not the 300 the engine would generate on its own


# ---- issue 12.6 ----
def test_prompt_tokens_are_counted_once_whatever_n(server):
    r = _complete(server, prompt=[5, 6, 7], max_tokens=2, n=3, temperature=1.0).json()
    usage = {k: r["usage"][k] for k in ("prompt_tokens", "completion_tokens", "total_tokens")}
    assert usage == {"prompt_tokens": 3, "completion_tokens": 6, "total_tokens": 9}
    assert r["usage"].get("prompt_tokens_details") is None  # vLLM's null unless --enable-prompt-tokens-details
    two = _complete(server, prompt=[[5, 6, 7], [8, 9]], max_tokens=1, n=2).json()["usage"]
    assert two["prompt_tokens"] == 5 and two["completion_tokens"] == 4
    messages = [{"role": "user", "content": "hi"}]
    count = httpx.post(server + "/tokenize", json={"messages": messages}, timeout=10).json()["count"]
    chat = httpx.post(
        server + "/v1/chat/completions",
        timeout=60,
        json={"messages": messages, "max_tokens": 2, "n": 2, "stream": True, "stream_options": {"include_usage": True}},
    )
    last = json.loads([x for x in chat.text.split("\n\n") if x.startswith("data: {")][-1][6:])
    assert last["usage"]["prompt_tokens"] == count and last["usage"]["completion_tokens"] == 4


# ---- issue 19.11 and 19.12 ----
def test_more_generations_than_the_queue_holds_is_a_400_naming_the_limit(server):
    r = _complete(server, prompt=[[5, 6]] * 64, max_tokens=1, n=16)
    assert r.status_code == 400 and str(MAX_WAITING) in r.json()["error"]["message"], r.text
    assert r.json()["error"]["param"] == "n" and "retry-after" not in r.headers


def test_the_largest_seed_with_n_2_wraps_instead_of_overflowing(server):
    r = _complete(server, prompt="Hi", max_tokens=4, temperature=1.0, n=2, seed=2**63 - 1)
    assert r.status_code == 200, r.text
    assert [c["finish_reason"] for c in r.json()["choices"]] == ["length", "length"]


# ---- issue 12.5 ----
def test_pathologically_nested_json_is_a_400(server):
    for raw in (b"[" * 100_000 + b"]" * 100_000, b'{"prompt": ' + b'{"a": ' * 50_000 + b"1" + b"}" * 50_001):
        r = httpx.post(
            server + "/v1/completions", content=raw, headers={"content-type": "application/json"}, timeout=30
        )
        assert r.status_code == 400, r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(server + "/health", timeout=10).status_code == 200


# ---- issue 19.4 ----
@pytest.mark.parametrize(
    "content_type", ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x", None]
)
def test_a_body_that_is_not_declared_json_is_a_415(server, content_type):
    headers = {"content-type": content_type} if content_type else {}
    for path in ("/v1/completions", "/tokenize"):
        r = httpx.post(server + path, content=b'{"prompt": "hi", "max_tokens": 1}', headers=headers, timeout=10)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["type"] == "invalid_request_error" and "application/json" in r.text


def test_json_with_a_charset_parameter_is_accepted(server):
    r = httpx.post(
        server + "/v1/completions",
        content=b'{"prompt": "hi", "max_tokens": 1}',
        headers={"content-type": "Application/JSON; charset=utf-8"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


# ---- issues 12.13 and 19.13 ----
KEY = "s3cret"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, demo_path):
    """An API key with /health and the OpenAPI document public; the demo model without its chat template."""
    cache = tmp_path_factory.mktemp("keyed")
    model = cache / "no-template"
    shutil.copytree(demo_path, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc, base = start_server(
        cache,
        "--model",
        str(model),
        "--kv-cache-tokens",
        "1024",
        "--context-len",
        "64",
        "--api-key",
        KEY,
        "--public-routes",
        "/health,/schema/openapi.json",
    )
    yield base
    stop_server(proc)


def test_schema_routes_need_the_key_unless_public(keyed):
    for path in ("/schema", "/schema/swagger", "/schema/openapi.yaml"):
        r = httpx.get(keyed + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
        assert httpx.get(keyed + path, headers={"authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    assert httpx.get(keyed + "/schema/openapi.json", timeout=10).status_code == 200  # listed public
    assert httpx.get(keyed + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("raw", [b"{", b'{"prompt": 5}', b"[" * 100_000 + b"]" * 100_000, b"x" * 1000])
def test_authentication_comes_before_validation(keyed, raw):
    r = httpx.post(keyed + "/v1/completions", content=raw, headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 401, r.text
    assert "prompt" not in r.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(keyed, scheme):
    r = httpx.post(
        keyed + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"authorization": f"{scheme} {KEY}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    bad = httpx.post(
        keyed + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"authorization": f"{scheme} {KEY}x"},
        timeout=30,
    )
    assert bad.status_code == 401


# ---- issue 12.7 ----
def test_text_prompts_get_the_tokenizers_bos_as_in_transformers(server, bos_model):
    from transformers import AutoTokenizer

    path, bos_id = bos_model
    expected = AutoTokenizer.from_pretrained(path)("The sea is")["input_ids"]
    assert expected[0] == bos_id
    got = httpx.post(server + "/tokenize", json={"prompt": "The sea is"}, timeout=10).json()["tokens"]
    assert got == expected
    r = _complete(server, prompt="The sea is", max_tokens=1, echo=True, logprobs=0, temperature=0).json()
    assert r["usage"]["prompt_tokens"] == len(expected)
    assert r["choices"][0]["logprobs"]["tokens"][0] == "<|endoftext|>"  # the echoed prompt starts with it
    assert r["choices"][0]["text"].startswith("The sea is")
    ids = _complete(server, prompt=expected[1:], max_tokens=1).json()  # token ids are taken as they are
    assert ids["usage"]["prompt_tokens"] == len(expected) - 1


# ---- issue 12.8 ----
def test_tokenize_messages_without_a_chat_template_is_a_400(keyed):
    auth = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(
        keyed + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth, timeout=10
    )
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"], r.text
    assert httpx.post(keyed + "/tokenize", json={"prompt": "hi"}, headers=auth, timeout=10).status_code == 200


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user"}]},
        {"messages": [{"content": "hi"}]},
        {"messages": [{"role": "user", "content": None}]},
        {"messages": "hi"},
        {},
        {"prompt": "x", "messages": [{"role": "user", "content": "hi"}]},
    ],
)
def test_tokenize_bad_messages_is_a_400(server, body):
    r = httpx.post(server + "/tokenize", json=body, timeout=10)
    assert r.status_code == 400, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


# ---- issue 19.3 ----
def test_a_huge_prompt_is_refused_before_it_is_tokenized(server):
    r = _complete(server, prompt="word " * (1 << 20), max_tokens=1)  # 5 MiB
    assert r.status_code == 400 and "characters" in r.json()["error"]["message"], r.text


def test_tokenizing_a_long_text_leaves_the_worker_serving(server):
    """/tokenize has no context bound: 2 MiB of text takes seconds to tokenize. /health on the same (only)
    worker keeps answering meanwhile: the longest gap between its answers is a small part of that time."""
    got = {}

    def tokenize():
        got["r"] = httpx.post(server + "/tokenize", json={"prompt": "word, and more " * 140_000}, timeout=300)

    during, start, end = _answers_while(server, tokenize)
    assert got["r"].status_code == 200 and got["r"].json()["count"] > 100_000
    assert len(during) > 10 and _longest_gap(during, start, end) < (end - start) / 3, (len(during), end - start)


# ---- issue 12.2 ----
def test_a_full_request_ring_is_awaited_then_refused_with_503(served):
    """With the engine stopped, 64 prompts × 4,000 ids × n=8 (8 MiB of Generate messages) cannot fit the
    4 MiB request ring. The worker waits for room without blocking its loop (/health keeps answering), then
    refuses the request with a 503 and aborts the choices it had queued; the engine, resumed, is left with
    nothing to run."""
    proc, base = served
    engine = _engine_pid(proc)
    assert wait_for_metric(base, RUNNING, 0, 60) == 0
    body = {"prompt": [[7] * 4000] * 64, "max_tokens": 1, "n": 8}
    got = {}

    def big():
        got["r"] = httpx.post(base + "/v1/completions", json=body, timeout=120)

    os.kill(engine, signal.SIGSTOP)
    try:
        during, start, end = _answers_while(base, big)
    finally:
        os.kill(engine, signal.SIGCONT)
    r = got["r"]
    assert r.status_code == 503 and "ring stayed full" in r.json()["error"]["message"], r.text
    assert len(during) > 10 and _longest_gap(during, start, end) < (end - start) / 3, (len(during), end - start)
    # The resumed engine first reads the choices that reached it, then their aborts: once a new request is
    # served, nothing of the refused one may be left.
    assert _complete(base, timeout=300, prompt="after", max_tokens=2).status_code == 200
    for name in (RUNNING, "ringllm_num_requests_waiting", "ringllm_kv_cache_slots_used_by_requests"):
        assert _settled_metric(base, name, 0) == 0, name


def _settled_metric(base, name, value, tries=600):
    """`name` once it reads `value` (or after `tries` readings); each reading may take a busy engine long."""
    for _ in range(tries):
        text = httpx.get(base + "/metrics", timeout=120).text
        got = next(float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith((name + " ", name + "{")))
        if got == value:
            break
        time.sleep(0.1)
    return got


# ---- issue 12.3 ----
def _sockets(pid: int) -> set[str]:
    inodes = set()
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[8:-1])
    return inodes


def _tcp(port: int, state: str) -> set[str]:
    """Inodes of the loopback TCP sockets with local port `port` in `state` (01 established, 0A listening)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            for line in f.readlines()[1:]:
                cols = line.split()
                if int(cols[1].rsplit(":", 1)[1], 16) == port and cols[3] == state:
                    found.add(cols[9])
    return found


def _api_workers(proc, port) -> list[int]:
    """The Granian workers of this test's server: the processes under it forked from it (same command line;
    the engine is a spawned interpreter)."""

    def cmdline(pid):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                return f.read()
        except OSError:
            return None

    serve = cmdline(proc.pid)
    return sorted(p for p in process_tree(proc.pid)[1:] if cmdline(p) == serve)


def test_one_api_workers_death_leaves_the_others_serving(tmp_path):
    """SIGKILL of one of two API workers while streams run on both: the other worker's streams finish with
    [DONE], the engine aborts the dead worker's requests, a new worker takes its ring pair over and serves."""
    proc, base = start_server(tmp_path, "--workers", "2", "--kv-cache-tokens", "16384", "--context-len", "512")
    port = int(base.rsplit(":", 1)[1])
    streams, results, started = [], [], threading.Semaphore(0)

    def stream():
        body = {"prompt": "stream", "max_tokens": 200, "ignore_eos": True, "stream": True}
        lines = []
        try:
            with httpx.stream("POST", base + "/v1/completions", json=body, timeout=300) as r:
                for line in r.iter_lines():
                    if line and not lines:
                        started.release()
                    lines += [line] if line else []
            results.append("done" if lines and lines[-1] == "data: [DONE]" else "cut: " + lines[-1][:200])
        except httpx.HTTPError as e:
            started.release()
            results.append(f"error: {type(e).__name__}")

    try:
        workers = _api_workers(proc, port)
        assert len(workers) == 2, workers
        established = _tcp(port, "01")
        per_worker = [0, 0]
        while min(per_worker) == 0 and len(streams) < 40:  # until each worker runs some of them
            for _ in range(4):
                streams.append(threading.Thread(target=stream))
                streams[-1].start()
                started.acquire(timeout=300)
            established = _tcp(port, "01")
            per_worker = [len(_sockets(w) & established) for w in workers]
        assert min(per_worker) > 0, per_worker
        victim, survivor = workers
        os.kill(victim, signal.SIGKILL)
        for t in streams:
            t.join(300)
        done = results.count("done")
        assert done >= per_worker[1] and all(r == "done" or r.startswith("error") for r in results), results
        assert proc.poll() is None  # the server is still up
        assert wait_for_metric(base, RUNNING, 0, 120) == 0  # the dead worker's requests were aborted
        for _ in range(100):  # Granian starts a new worker in the dead one's place
            new = [w for w in _api_workers(proc, port) if w not in workers]
            if new:
                break
            time.sleep(0.2)
        assert new, "no worker was started in place of the dead one"
        log = (tmp_path / "serve.log").read_text()
        for _ in range(100):
            if log.count('"app worker ready"') == 3:
                break
            time.sleep(0.2)
            log = (tmp_path / "serve.log").read_text()
        assert log.count('"app worker ready"') == 3, log[-3000:]  # it claimed the dead worker's pair
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            codes = list(pool.map(lambda i: _complete(base, prompt=f"after {i}", max_tokens=4).status_code, range(24)))
        assert codes == [200] * 24
        assert survivor in _api_workers(proc, port)
    finally:
        stop_server(proc)


def test_a_stream_that_fails_unexpectedly_ends_with_an_error_event():
    import asyncio

    from ringllm.app.sse import sse_stream

    async def events():
        yield b"data: {}\n\n"
        raise RuntimeError("a bug")

    async def frames():
        return [f async for f in sse_stream(events())]

    got = asyncio.run(frames())
    assert got[0] == b"data: {}\n\n" and json.loads(got[-1][6:])["error"]["type"] == "server_error"
