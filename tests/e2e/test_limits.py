"""Limits on the demo model over loopback: hostile bodies, the body size limit, the API key guarding /v1 and
/metrics, overload (503 with Retry-After), the request timeout, and a KV pool that runs out (preemption). Every
test asserts status codes and that the server is whole afterwards: KV pool usage back at its baseline.

On a loaded machine: each test owns what it starts (the server's group is killed at the end whatever happens;
its engine and segments are found from the server's own pid), and waits follow the work (counts, events seen in
/metrics or a stream, or generous bounds that only a stuck server reaches), never a speed."""

import concurrent.futures
import threading
import time

import httpx
import pytest

from tests.helpers import (
    metric,
    serving,
    start_server,
    stop_server,
    wait_for_metric,
)

KEY = "k3y"
AUTH = {"authorization": f"Bearer {KEY}"}
SLOTS = "ringllm_kv_cache_slots_used_by_requests"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """Small queue and batch (overload is easy to reach), an API key with /health public and /metrics guarded.
    Its request timeout only bounds a stuck request: a short one on a busy machine must not hit it."""
    cache = tmp_path_factory.mktemp("reliability")
    proc, base = start_server(
        cache,
        "--kv-cache-tokens",
        "8192",
        "--context-len",
        "2048",
        "--max-bs",
        "2",
        "--max-waiting-requests",
        "2",
        "--request-timeout",
        "600",
        "--api-key",
        KEY,
        "--public-routes",
        "/health",
    )
    yield base
    stop_server(proc)


def _post(base, path, timeout=900, headers=None, **kw):
    return httpx.post(base + path, headers={**AUTH, **(headers or {})}, timeout=timeout, **kw)


def _assert_serves(base):
    r = _post(base, "/v1/completions", json={"prompt": "still here", "max_tokens": 3})
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3


HOSTILE = [
    ("/v1/completions", b"{", 400),
    ("/v1/completions", b"[]", 400),
    ("/v1/completions", b'{"prompt": "\xff\xfe"}', 400),
    ("/v1/completions", b'{"prompt": 5}', 400),
    ("/v1/completions", b'{"prompt": [[1, 2], "x"]}', 400),
    ("/v1/completions", b'{"prompt": [1e400]}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": -5}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 1000000000}', 400),
    ("/v1/completions", b'{"prompt": "x", "max_tokens": 99999999999999999999999}', 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": -1}', 400),
    ("/v1/completions", b'{"prompt": "x", "temperature": NaN}', 400),
    ("/v1/completions", b'{"prompt": "x", "top_p": 0}', 400),
    ("/v1/completions", b'{"prompt": "x", "top_p": 1.5}', 400),
    ("/v1/completions", b'{"prompt": "x", "n": 0}', 400),
    ("/v1/completions", b'{"prompt": "x", "n": 1000}', 400),
    ("/v1/completions", b'{"prompt": "x", "logprobs": 99}', 400),
    ("/v1/completions", b'{"prompt": [1, 2, 1000000000]}', 400),
    ("/v1/completions", b'{"prompt": [-1]}', 400),
    (
        "/v1/completions",
        b'{"prompt": "x", "stop": ["a","b","c","d","e","f","g","h","i","j","k","l","m","n","o","p","q"]}',
        400,
    ),
    ("/v1/completions", b'{"prompt": "x", "stop": [""]}', 400),
    ("/v1/completions", b'{"prompt": "x", "stop_token_ids": [' + b",".join([b"1"] * 100) + b"]}", 400),
    ("/v1/completions", b'{"prompt": "x", "seed": 99999999999999999999}', 400),
    ("/v1/completions", b'{"prompt": "' + b"word " * 3000 + b'"}', 400),  # over the context
    ("/v1/chat/completions", b'{"messages": []}', 400),
    # Any role string goes to the chat template (as vLLM); a role that is not a non-empty string is refused.
    ("/v1/chat/completions", b'{"messages": [{"role": 7, "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "", "content": "hi"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user"}]}', 400),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": 7}]}', 400),
    ("/v1/chat/completions", b'{"messages": "hi"}', 400),
    (
        "/v1/chat/completions",
        b'{"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 50, "logprobs": true}',
        400,
    ),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}', 400),
    ("/tokenize", b'{"prompt": 3}', 400),
    ("/detokenize", b'{"tokens": [1, -7]}', 400),
    ("/detokenize", b'{"tokens": "abc"}', 400),
]


def test_hostile_bodies_get_clear_errors_and_the_server_keeps_serving(server):
    for path, body, status in HOSTILE:
        r = _post(server, path, content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (path, body[:80], r.status_code, r.text[:300])
        error = r.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], (body[:80], error)
    too_long = _post(
        server,
        "/v1/completions",
        content=b'{"prompt": "' + b"word " * 3000 + b'"}',
        headers={"content-type": "application/json"},
    ).json()["error"]["message"]
    assert "tokens" in too_long and "2048" in too_long, too_long  # the counts are named
    _assert_serves(server)
    assert wait_for_metric(server, SLOTS, 0, 60, AUTH) == 0


def test_a_role_of_the_clients_own_reaches_the_chat_template(server):
    # As vLLM: any role string is the template's to render; the demo model's template writes every role it gets.
    messages = [{"role": "wizard", "content": "hi"}]
    tokens = _post(server, "/tokenize", json={"messages": messages}).json()["tokens"]
    prompt = _post(server, "/detokenize", json={"tokens": tokens}).json()["prompt"]
    assert "wizard\nhi" in prompt and prompt.endswith("assistant\n"), prompt
    r = _post(server, "/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == len(tokens), r.text


def test_body_over_the_size_limit_is_413(server):
    r = _post(
        server,
        "/v1/completions",
        content=b'{"prompt": "' + b"x" * (9 << 20) + b'"}',
        headers={"content-type": "application/json"},
    )
    assert r.status_code == 413 and r.json()["error"]["message"]
    _assert_serves(server)


def test_api_key_guards_v1_and_metrics_but_not_health(server):
    assert httpx.post(server + "/v1/completions", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server + "/v1/models").status_code == 401
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.post(server + "/tokenize", json={"prompt": "x"}).status_code == 401
    assert httpx.get(server + "/health").status_code == 200
    assert httpx.get(server + "/v1/models", headers=AUTH).status_code == 200


class _Stream(threading.Thread):
    """A streamed completion read in the background until it ends or `close()` hangs up on it (the server then
    aborts it and frees its slots)."""

    def __init__(self, base: str, body: dict):
        super().__init__(daemon=True)
        self.base, self.body = base, body
        self.status, self.tokens, self.ended = 0, 0, False
        self.first, self.hang_up = threading.Event(), threading.Event()

    def run(self) -> None:
        with httpx.stream("POST", self.base + "/v1/completions", json=self.body, headers=AUTH, timeout=900) as r:
            self.status = r.status_code
            for line in r.iter_lines():
                if line == "data: [DONE]":
                    self.ended = True
                elif line.startswith("data: {"):
                    self.tokens += 1
                    self.first.set()
                if self.hang_up.is_set():
                    break
        self.first.set()

    def close(self) -> None:
        self.hang_up.set()
        self.join(120)
        assert not self.is_alive()


def test_overload_answers_503_with_retry_after_at_once(server):
    """2 running + 2 waiting fill the engine; the rest are refused at once (before any admitted request ends),
    and pool usage returns to 0.

    Event-driven, so it holds at any speed and its work is bounded: the 2 running requests are streams far
    longer than the test needs (2,000 tokens), each seen running by its first token; the 2 waiting ones are
    then sent and seen waiting in /metrics; all 6 sent next must be refused. Then the client hangs up on the
    running streams (the server aborts them and frees their slots), and the waiting requests run and complete.
    (Sizing the requests from a measured rate instead once asked a loaded machine for minutes of decoding:
    the admitted requests ran into --request-timeout and the test into pytest's timeout.)"""
    t0 = time.monotonic()

    def one(body):
        t = time.monotonic()
        r = _post(server, "/v1/completions", json=body)
        return r.status_code, time.monotonic() - t, r.headers.get("retry-after"), r.json(), time.monotonic() - t0

    running = [_Stream(server, {"prompt": "busy", "max_tokens": 2000, "ignore_eos": True, "stream": True})]
    running.append(_Stream(server, running[0].body))
    for stream in running:
        stream.start()
        assert stream.first.wait(300) and stream.status == 200 and stream.tokens > 0
    waiting = {"prompt": "queued", "max_tokens": 16, "ignore_eos": True}
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        try:
            queued = [pool.submit(one, waiting) for _ in range(2)]
            assert wait_for_metric(server, "ringllm_num_requests_waiting", 2, 120, AUTH) == 2
            assert metric(server, "ringllm_num_requests_running", AUTH) == 2
            refused = list(pool.map(one, [waiting] * 6))
            assert not any(f.done() for f in queued) and not any(s.ended for s in running)
        finally:
            hung_up = time.monotonic() - t0
            for stream in running:
                stream.close()
        admitted = [f.result() for f in queued]
    assert [r[0] for r in refused] == [503] * 6, [(r[0], r[3]) for r in refused]
    assert all(retry == "1" and "queue is full" in body["error"]["message"] for _, _, retry, body, _ in refused)
    assert max(r[1] for r in refused) < min(r[1] for r in admitted)
    assert max(r[4] for r in refused) < hung_up < min(r[4] for r in admitted)  # none ended before the refusals
    assert [r[0] for r in admitted] == [200, 200] and all(s.status == 200 for s in running)
    assert all(r[3]["usage"]["completion_tokens"] == 16 for r in admitted)
    assert wait_for_metric(server, SLOTS, 0, 60, AUTH) == 0
    assert metric(server, "ringllm_num_requests_waiting", AUTH) == 0
    _assert_serves(server)


def test_request_timeout_aborts_and_frees_slots(tmp_path):
    """--request-timeout 1.5 against requests for 2000 tokens (several seconds even on a fast machine): 504, or an
    error event ending the stream, and the KV slots are freed."""
    with serving(tmp_path, "--kv-cache-tokens", "4096", "--context-len", "2048", "--request-timeout", "1.5") as (
        proc,
        base,
    ):
        body = {"prompt": "long", "max_tokens": 2000, "ignore_eos": True}
        t = time.monotonic()
        r = httpx.post(base + "/v1/completions", json=body, timeout=600)
        assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error"  # not 200: it was cut short
        assert time.monotonic() - t > 1.4
        with httpx.stream("POST", base + "/v1/completions", timeout=600, json=body | {"stream": True}) as s:
            events = [line for line in s.iter_lines() if line.startswith("data: ")]
        assert '"timeout_error"' in events[-1]  # the stream ends with an error event
        assert wait_for_metric(base, SLOTS, 0, 60) == 0
        assert metric(base, "ringllm_generation_tokens_total") > 0
        assert httpx.get(base + "/health", timeout=60).status_code == 200
        stop_server(proc)


def test_kv_pool_running_out_preempts_and_fails_nothing(tmp_path):
    """8 requests that need 8 x 250 slots share a pool of 600: the scheduler preempts and recomputes, and every
    request still gets all its tokens."""
    with serving(
        tmp_path, "--kv-cache-tokens", "600", "--context-len", "256", "--max-bs", "8", "--disable-radix-cache"
    ) as (proc, base):

        def one(i):
            return httpx.post(
                base + "/v1/completions",
                timeout=600,
                json={"prompt": f"request number {i}", "max_tokens": 240, "ignore_eos": True, "temperature": 0},
            )

        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(one, range(8)))
        assert [r.status_code for r in results] == [200] * 8
        assert all(r.json()["usage"]["completion_tokens"] == 240 for r in results)
        assert metric(base, "ringllm_preemptions_total") > 0
        assert wait_for_metric(base, SLOTS, 0, 60) == 0
        stop_server(proc)
