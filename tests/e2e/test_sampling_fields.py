"""Sampling fields over HTTP (demo model, loopback): out-of-range penalties and logit_bias are 400s naming the
field, logit_bias and vLLM's extensions act on the output, fields ringllm does not implement are refused by
name and fields that ask for nothing are accepted. The same fields offline: tests/engine/test_sampling_params.py."""

import httpx
import pytest

from tests.helpers import start_server, stop_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, base = start_server(tmp_path_factory.mktemp("contract"), "--kv-cache-tokens", "4096", "--context-len", "256")
    yield base
    stop_server(proc)


def _post(base, path, body):
    return httpx.post(base + path, json=body, timeout=60)


@pytest.mark.parametrize(
    "field,value", [("repetition_penalty", 1e-300), ("presence_penalty", 5), ("frequency_penalty", -2.5)]
)
def test_penalties_out_of_their_finite_range_are_400(server, field, value):
    r = _post(server, "/v1/completions", {"prompt": "x", field: value})
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def _greedy(base, prompt, **kw):
    r = _post(
        base,
        "/v1/completions",
        {"prompt": prompt, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "logprobs": 0, **kw},
    )
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def test_logit_bias_bans_and_forces_tokens_through_the_server(server):
    ids = _post(server, "/tokenize", {"prompt": "The sea is"}).json()["tokens"]
    free = _greedy(server, ids)
    first = _post(server, "/tokenize", {"prompt": free["logprobs"]["tokens"][0]}).json()["tokens"]
    assert len(first) == 1
    banned = _greedy(server, ids, logit_bias={str(first[0]): -100})
    assert banned["logprobs"]["tokens"][0] != free["logprobs"]["tokens"][0]
    forced = _greedy(server, ids, logit_bias={"42": 100})
    assert forced["text"] == _post(server, "/detokenize", {"tokens": [42] * 8}).json()["prompt"]


@pytest.mark.parametrize("bias", [{"100000": 5}, {"7": 101}, {"x": 1}])
def test_bad_logit_bias_is_400(server, bias):
    r = _post(server, "/v1/completions", {"prompt": "x", "logit_bias": bias})
    assert r.status_code == 400 and "logit_bias" in r.json()["error"]["message"], r.text


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
REFUSED = [
    ("/v1/completions", {"prompt": "x", "suffix": " the end"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    (
        "/v1/completions",
        {"prompt": "x", "stream": True, "stream_options": {"include_obfuscation": True}},
        "include_obfuscation",
    ),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {**CHAT, "audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {**CHAT, "prediction": {"type": "content", "content": "hi"}}, "prediction"),
    ("/v1/chat/completions", {**CHAT, "service_tier": "priority"}, "service_tier"),
    ("/v1/chat/completions", {**CHAT, "store": True}, "store"),
    ("/v1/chat/completions", {**CHAT, "reasoning_effort": "high"}, "reasoning_effort"),
    ("/v1/chat/completions", {**CHAT, "web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {**CHAT, "no_such_field": 1}, "no_such_field"),
    ("/v1/completions", {"prompt": "x", "use_beam_search": True}, "use_beam_search"),
    ("/v1/chat/completions", {**CHAT, "length_penalty": 0.8}, "length_penalty"),
    ("/v1/completions", {"prompt": "x", "priority": 2}, "priority"),  # only with --scheduling-policy priority
    ("/v1/completions", {"prompt": "x", "stream": True, "prompt_logprobs": 1}, "prompt_logprobs"),
]


@pytest.mark.parametrize("path,body,field", REFUSED, ids=[f for _, _, f in REFUSED])
def test_unimplemented_fields_are_refused_by_name(server, path, body, field):
    r = _post(server, path, body)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_vllms_sampling_extensions_through_the_server(server):
    """allowed_token_ids, bad_words, truncate_prompt_tokens and prompt_logprobs on a real engine, over HTTP."""
    ids = _post(server, "/tokenize", {"prompt": "The sea is calm tonight"}).json()["tokens"]
    free = _greedy(server, ids)
    forced = _greedy(server, ids, allowed_token_ids=[42])
    assert forced["text"] == _post(server, "/detokenize", {"tokens": [42] * 8}).json()["prompt"]

    # bad_words: a token of the free output that is a word vLLM's rule bans as that one token (the word alone,
    # or after a space where both spellings are as long); the output then never holds it
    def tokens(text):
        return _post(server, "/tokenize", {"prompt": text, "add_special_tokens": False}).json()["tokens"]

    def banned_as_it_is(piece):
        alone, spaced = tokens(piece.strip()), tokens(" " + piece.strip())
        spellings = [alone] + ([spaced] if spaced[0] != alone[0] and len(spaced) == len(alone) else [])
        return piece.strip().isalpha() and len(tokens(piece)) == 1 and tokens(piece) in spellings

    piece = next(p for p in free["logprobs"]["tokens"] if banned_as_it_is(p))
    banned = _greedy(server, ids, bad_words=[piece.strip()])
    assert piece not in banned["logprobs"]["tokens"] and banned["text"] != free["text"]
    r = _post(server, "/v1/completions", {"prompt": ids, "max_tokens": 1, "truncate_prompt_tokens": 2})
    assert r.status_code == 200 and r.json()["usage"]["prompt_tokens"] == 2, r.text
    for path, body in [("/v1/completions", {"prompt": ids}), ("/v1/chat/completions", CHAT)]:
        r = _post(server, path, {**body, "max_tokens": 1, "prompt_logprobs": 1})
        assert r.status_code == 200, r.text
        got = r.json()["choices"][0] if path == "/v1/completions" else r.json()
        lps = got["prompt_logprobs"]
        assert lps[0] is None and all(1 <= len(entry) <= 2 for entry in lps[1:])
        for entry in lps[1:]:
            ranks = sorted(v["rank"] for v in entry.values())
            assert ranks[0] == 1 and all(isinstance(v["decoded_token"], str) for v in entry.values())
        if path == "/v1/completions":
            assert len(lps) == len(ids) and all(str(t) in entry for t, entry in zip(ids[1:], lps[1:]))


def test_fields_that_ask_for_nothing_are_accepted(server):
    ok = {
        "user": "u1",
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "service_tier": "auto",
        "use_beam_search": False,
        "length_penalty": 1.0,
        "priority": 0,
    }
    assert (
        _post(
            server, "/v1/completions", {"prompt": "x", "max_tokens": 2, "best_of": 1, "suffix": None, **ok}
        ).status_code
        == 200
    )
    assert (
        _post(
            server,
            "/v1/chat/completions",
            {**CHAT, "modalities": ["text"], "store": False, "logprobs": True, "top_logprobs": 2, **ok},
        ).status_code
        == 200
    )


def test_every_token_id_field_is_checked_against_the_vocabulary(server):
    """One check (SamplingParams.token_id_outside) serves the API worker and the engine (its engine half:
    tests/engine/test_sampling_params.py)."""
    r = _post(server, "/v1/completions", {"prompt": "x", "stop_token_ids": [5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
