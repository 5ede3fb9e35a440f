"""One request's way through one server (demo model with a BOS token, one API worker, loopback; issues 12 and
19): stop strings end the request in the engine, usage counted once whatever n, limits on n and seeds, nested
JSON and Content-Type, BOS as transformers adds it, /tokenize bounds, big prompts, and a full request ring
awaited then refused with 503."""

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
    """A prompt to truncate has no context bound (truncate_prompt_tokens cuts it after tokenizing): 2 MiB of text
    takes seconds to tokenize. /health on the same (only) worker keeps answering meanwhile: the longest gap between
    its answers is a small part of that time. (/tokenize itself refuses a text the context cannot hold.)"""
    got = {}

    def tokenize():
        body = {"prompt": "word, and more " * 140_000, "max_tokens": 1, "truncate_prompt_tokens": 16}
        got["r"] = httpx.post(server + "/v1/completions", json=body, timeout=300)

    during, start, end = _answers_while(server, tokenize)
    assert got["r"].status_code == 200 and got["r"].json()["usage"]["prompt_tokens"] == 16, got["r"].text
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
