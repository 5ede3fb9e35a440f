"""The request contract (ipc/sampling.py): every sampling field is declared once, with its bounds, and flows
from the OpenAI body through the ring to the engine; the server answers 400 for what it does not do."""

import math

import httpx
import msgspec
import pytest

from ringllm.app.schemas import ChatRequest, CompletionRequest
from ringllm.ipc import messages as m
from ringllm.ipc.sampling import SamplingFields, SamplingParams, StructuredOutputs
from tests.helpers import start_server, stop_server

# A value other than the default for every shared field: a field added to SamplingFields without a value
# here fails the first test, so it is never forgotten on the way from the body to the engine.
CHANGED = {
    "temperature": 0.5,
    "top_p": 0.9,
    "top_k": 5,
    "min_p": 0.1,
    "seed": 7,
    "repetition_penalty": 1.1,
    "presence_penalty": 0.5,
    "frequency_penalty": -0.5,
    "ignore_eos": True,
    "stop_token_ids": [3, 4],
    "logit_bias": {"9": -100},
    "structured_outputs": {"regex": "[ab]+"},
}


@pytest.mark.parametrize(
    "body_type,extra",
    [(CompletionRequest, {"prompt": "x"}), (ChatRequest, {"messages": [{"role": "user", "content": "x"}]})],
)
def test_every_sampling_field_flows_from_the_body_to_the_engine(body_type, extra):
    assert set(CHANGED) == set(SamplingFields.__struct_fields__)
    body = msgspec.json.decode(msgspec.json.encode({**CHANGED, **extra, "stop": "END"}), type=body_type)
    params = body.sampling_params(max_tokens=5)
    wire = msgspec.msgpack.decode(m.encode(m.Generate("r", m.pack_ids([1]), params)), type=m.Generate).sampling
    for got in (params, wire):
        for name, value in CHANGED.items():
            want = {"logit_bias": {9: -100.0}, "structured_outputs": StructuredOutputs(regex="[ab]+")}.get(name, value)
            assert getattr(got, name) == want, name
        assert got.max_tokens == 5 and got.stop == ["END"]


@pytest.mark.parametrize(
    "field,value",
    [
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 2.5),
        ("presence_penalty", -3.0),
        ("frequency_penalty", 2.01),
        ("temperature", float("nan")),
        ("max_tokens", 0),
        ("top_p", 0.0),
        ("stop", [""]),
        ("logit_bias", {1: 101.0}),
        ("logit_bias", {-1: 1.0}),
    ],
)
def test_bounds_are_checked_when_built_and_when_decoded(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})
    if not (isinstance(value, float) and math.isnan(value)):  # NaN has no JSON round trip worth testing
        with pytest.raises(msgspec.ValidationError, match=field):
            msgspec.msgpack.decode(msgspec.msgpack.encode({field: value}), type=SamplingParams)


def test_structured_outputs_take_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs(regex="a", choice=["b"])
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputs()
    assert StructuredOutputs(json={"type": "object"}).key == ("json", '{"type":"object"}', False)


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


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from ringllm.engine import LLM
    from ringllm.engine.demo import demo_model_path

    path = demo_model_path(tmp_path_factory.mktemp("cache"))
    with LLM(model=str(path), device="cpu", kv_cache_tokens=4096, context_len=256) as llm:
        yield llm


def test_logit_bias_bans_and_forces_tokens_offline(llm):
    from ringllm.engine.engine import RequestError

    greedy = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}
    [free] = llm.generate_batch(["The sea is"], SamplingParams(**greedy))
    [banned] = llm.generate_batch(["The sea is"], SamplingParams(**greedy, logit_bias={free.token_ids[0]: -100}))
    assert banned.token_ids[0] != free.token_ids[0]
    [forced] = llm.generate_batch(["The sea is"], SamplingParams(**greedy, logit_bias={42: 100.0}))
    assert forced.token_ids == [42] * 8
    # Sampled rows and rows without a bias share the batch: only the biased one changes.
    both = llm.generate_batch(
        ["The sea is", "The sea is"],
        [SamplingParams(**greedy), SamplingParams(**{**greedy, "temperature": 1.0}, seed=3, logit_bias={42: 100.0})],
    )
    assert both[0].token_ids == free.token_ids and both[1].token_ids == [42] * 8
    with pytest.raises(RequestError, match="logit_bias"):
        llm.generate_batch(["x"], SamplingParams(logit_bias={10**6: 1.0}))


CHAT = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
REFUSED = [
    ("/v1/completions", {"prompt": "x", "suffix": " the end"}, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, "best_of"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 3}, "min_tokens"),  # a vLLM extension ringllm lacks
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
]


@pytest.mark.parametrize("path,body,field", REFUSED, ids=[f for _, _, f in REFUSED])
def test_unimplemented_fields_are_refused_by_name(server, path, body, field):
    r = _post(server, path, body)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text


def test_fields_that_ask_for_nothing_are_accepted(server):
    ok = {"user": "u1", "safety_identifier": "s", "prompt_cache_key": "k", "service_tier": "auto"}
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


def test_every_token_id_field_is_checked_against_the_vocabulary(server, llm):
    """One check (SamplingParams.token_id_outside) serves the API worker and the engine."""
    from ringllm.engine.engine import RequestError

    r = _post(server, "/v1/completions", {"prompt": "x", "stop_token_ids": [5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    with pytest.raises(RequestError, match="stop_token_ids: token id 5000"):
        llm.generate_batch(["x"], SamplingParams(stop_token_ids=[5000]))
