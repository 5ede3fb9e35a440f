"""`ringllm serve` on the demo model, driven by the official openai client over loopback."""

import concurrent.futures

import httpx
import pytest

from tests.helpers import metric, start_server, stop_server, wait_for_metric


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    proc, base = start_server(
        cache,
        "--kv-cache-tokens",
        "8192",
        "--context-len",
        "256",
        "--workers",
        "2",
        "--served-model-name",
        "demo",
        "--profiler-dir",
        str(cache / "profiles"),
    )
    yield base
    stop_server(proc)


@pytest.fixture
def client(server):
    from openai import OpenAI

    return OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=30)


def test_completions_and_chat(client):
    r = client.completions.create(model="demo", prompt="The sea is", max_tokens=8, temperature=0)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 8 and r.choices[0].text
    chunks = list(
        client.completions.create(model="demo", prompt="The sea is", max_tokens=8, temperature=0, stream=True)
    )
    assert "".join(c.choices[0].text for c in chunks) == r.choices[0].text
    c = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], max_tokens=6, temperature=0
    )
    assert c.choices[0].message.role == "assistant" and c.usage.completion_tokens == 6
    stream = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=6,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    pieces = list(stream)
    text = "".join(p.choices[0].delta.content or "" for p in pieces if p.choices)
    assert text == c.choices[0].message.content and pieces[-1].usage.completion_tokens == 6


def test_usage_counts_match_the_tokenizer(server, client):
    prompt = "The sea is wide, café 日本語"
    count = httpx.post(server + "/tokenize", json={"prompt": prompt}).json()["count"]
    r = client.completions.create(model="demo", prompt=prompt, max_tokens=3, temperature=0)
    assert r.usage.prompt_tokens == count and r.usage.completion_tokens == 3 and r.usage.total_tokens == count + 3


def test_stop_string_and_seed(client):
    full = client.completions.create(model="demo", prompt="Once", max_tokens=30, temperature=0).choices[0].text
    stop = full[8:11]
    cut = client.completions.create(model="demo", prompt="Once", max_tokens=30, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].text == full[: full.find(stop)]
    a = client.completions.create(model="demo", prompt="Hi", max_tokens=10, temperature=1.0, seed=7)
    b = client.completions.create(model="demo", prompt="Hi", max_tokens=10, temperature=1.0, seed=7)
    assert a.choices[0].text == b.choices[0].text


@pytest.mark.parametrize(
    "body,status",
    [
        ({"prompt": "x", "max_tokens": -1}, 400),
        ({"prompt": "x", "temperature": "hot"}, 400),
        ({"prompt": "x", "temperature": 9}, 400),
        ({"prompt": [10**7]}, 400),
        ({"prompt": "x " * 400}, 400),
        ({"prompt": "x", "model": "other"}, 404),
        ({"prompt": ""}, 400),
        ({}, 400),
    ],
)
def test_errors_in_openai_shape(server, body, status):
    r = httpx.post(server + "/v1/completions", json=body, timeout=10)
    assert r.status_code == status, r.text
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_invalid_utf8_and_bad_json(server):
    for raw in (b'{"prompt": "\xff\xfe"}', b"{not json"):
        r = httpx.post(server + "/v1/completions", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 400 and "error" in r.json()
    assert httpx.get(server + "/health").status_code == 200


def test_two_workers_serve_concurrent_requests(client):
    def one(i):
        return client.completions.create(model="demo", prompt=f"request {i}", max_tokens=12, temperature=0)

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(16)))
    assert all(r.usage.completion_tokens == 12 for r in results)


def test_metrics_and_disconnect_frees_slots(server):
    with httpx.stream(
        "POST",
        server + "/v1/completions",
        timeout=30,
        json={"prompt": "long", "max_tokens": 200, "ignore_eos": True, "stream": True},
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 4:
                break  # disconnect mid-stream
    wait_for_metric(server, "ringllm_kv_cache_slots_used_by_requests", 0, 5)
    assert metric(server, "ringllm_kv_cache_slots_used_by_requests") == 0
    assert metric(server, "ringllm_num_requests_running") == 0
    text = httpx.get(server + "/metrics").text
    assert "ringllm_time_to_first_token_seconds_bucket" in text and "ringllm_generation_tokens_total" in text


def test_tokenize_round_trip(server):
    ids = httpx.post(server + "/tokenize", json={"prompt": "café 日本語"}).json()["tokens"]
    assert httpx.post(server + "/detokenize", json={"tokens": ids}).json()["prompt"] == "café 日本語"
    assert httpx.post(server + "/detokenize", json={"tokens": [-1]}).status_code == 400


def test_n_and_lists_of_prompts(client):
    r = client.completions.create(
        model="demo", prompt=["The sea", "A river"], max_tokens=5, temperature=1.0, n=2, seed=1
    )
    assert sorted(c.index for c in r.choices) == [0, 1, 2, 3]
    assert all(c.finish_reason == "length" for c in r.choices) and r.usage.completion_tokens == 20
    ids = client.completions.create(model="demo", prompt=[[5, 6, 7], [8, 9]], max_tokens=3, temperature=0)
    assert len(ids.choices) == 2
    chat = client.chat.completions.create(
        model="demo", messages=[{"role": "user", "content": "hi"}], n=3, max_tokens=4, temperature=1.0, seed=3
    )
    assert len(chat.choices) == 3 and len({c.message.content for c in chat.choices}) > 1


def test_logprobs(client):
    r = client.completions.create(model="demo", prompt="The sea", max_tokens=4, temperature=0, logprobs=3)
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 4 and len(lp.token_logprobs) == 4 and all(len(t) == 3 for t in lp.top_logprobs)
    assert all(x <= 0 for x in lp.token_logprobs)
    # greedy: the chosen token is the most likely one
    assert all(abs(max(t.values()) - x) < 1e-4 for t, x in zip(lp.top_logprobs, lp.token_logprobs))
    c = client.chat.completions.create(
        model="demo",
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=3,
        temperature=0,
        logprobs=True,
        top_logprobs=2,
    )
    content = c.choices[0].logprobs.content
    assert len(content) == 3 and all(len(t.top_logprobs) == 2 for t in content)


def test_non_streaming_disconnect_aborts(server):
    generated = metric(server, "ringllm_generation_tokens_total")
    with pytest.raises(httpx.ReadTimeout):  # 8 x 240 tokens take well over the 0.25 s the client waits
        httpx.post(
            server + "/v1/completions",
            json={"prompt": "slow", "max_tokens": 240, "ignore_eos": True, "n": 8},
            timeout=0.25,
        )
    wait_for_metric(server, "ringllm_kv_cache_slots_used_by_requests", 0, 10)
    assert metric(server, "ringllm_kv_cache_slots_used_by_requests") == 0
    assert metric(server, "ringllm_num_requests_running") == 0
    assert metric(server, "ringllm_generation_tokens_total") - generated < 8 * 240  # stopped early, not run out


def test_profile_control(server):
    assert httpx.post(server + "/start_profile", timeout=10).json() == {"profiling": True}
    httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=10)
    assert httpx.post(server + "/stop_profile", timeout=30).json() == {"profiling": False}
