"""The request contract (ipc/sampling.py): every sampling field is declared once, with its bounds, and flows
from the OpenAI body through the ring to the engine's sampler (or to what handles it instead); the server
answers 400 for what it does not do."""

import math

import httpx
import msgspec
import numpy as np
import pytest

from ringllm.app.schemas import ChatRequest, CompletionRequest
from ringllm.engine.sampler import NOT_SAMPLED, ROW_FIELDS, RowTable
from ringllm.engine.sampler.rows import KERNEL, RUNNER
from ringllm.ipc import messages as m
from ringllm.ipc.sampling import SamplingFields, SamplingParams, StructuredOutputs
from ringllm.text.bad_words import bad_words_token_ids
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
    "min_tokens": 2,
    "stop_token_ids": [3, 4],
    "logit_bias": {"9": -100},
    "structured_outputs": {"regex": "[ab]+"},
    "allowed_token_ids": [5, 6],
    "bad_words": ["sea"],
    "prompt_logprobs": 1,
    "priority": -3,
    "truncate_prompt_tokens": 3,
    "truncation_side": "right",
}


# min_tokens and structured_outputs cannot be combined (the grammar decides where the output ends): the
# fields go in two bodies.
BODIES = [{k: v for k, v in CHANGED.items() if k != "min_tokens"}, {"min_tokens": CHANGED["min_tokens"]}]
# set by the app: from OpenAI's shapes, and bad_words as the tokenizer makes them
ENGINE_FIELDS = {"max_tokens": 5, "logprobs": 2, "bad_words_token_ids": [[3, 4]]}


def _to_the_engine(body_type, body: dict, extra: dict, **engine_fields) -> list[SamplingParams]:
    """The body decoded as the API worker decodes it, and its parameters as built there (with the engine's
    shapes of OpenAI's fields, `engine_fields`) and as decoded from the ring."""
    decoded = msgspec.json.decode(msgspec.json.encode({**body, **extra, "stop": "END"}), type=body_type)
    params = decoded.sampling_params(**engine_fields)
    wire = msgspec.msgpack.decode(m.encode(m.Generate("r", m.pack_ids([1]), params)), type=m.Generate).sampling
    return [params, wire]


@pytest.mark.parametrize(
    "body_type,extra",
    [(CompletionRequest, {"prompt": "x"}), (ChatRequest, {"messages": [{"role": "user", "content": "x"}]})],
)
def test_every_sampling_field_flows_from_the_body_to_the_engine(body_type, extra):
    assert set(CHANGED) == set(SamplingFields.__struct_fields__)
    for body in BODIES:
        for got in _to_the_engine(body_type, body, extra, **ENGINE_FIELDS):
            for name, value in body.items():
                want = {"logit_bias": {9: -100.0}, "structured_outputs": StructuredOutputs(regex="[ab]+")}.get(
                    name, value
                )
                assert getattr(got, name) == want, name
            assert got.max_tokens == 5 and got.stop == ["END"]


def test_every_request_field_reaches_a_sampler_row_or_what_handles_it():
    """Each field of SamplingParams is read by a row of the sampler's table (engine/sampler/rows.py) or named in
    NOT_SAMPLED with what handles it instead (the stop checks, the text layer, the grammar): a new field with
    neither fails here."""
    fields = set(SamplingParams.__struct_fields__)
    read = {f.param for f in ROW_FIELDS if f.param is not None}
    assert read | set(NOT_SAMPLED) == fields, f"not handled anywhere: {fields - read - set(NOT_SAMPLED)}"
    assert not read & set(NOT_SAMPLED), "a field is read by a row and said to be handled elsewhere"


@pytest.mark.parametrize("name", sorted({f.param for f in ROW_FIELDS if f.param is not None}))
def test_a_changed_field_reaches_its_sampler_row_from_the_body(name):
    """Body -> ring -> the sampler's row table: the changed value lands in each of its columns; a column of a
    stage beyond the fused pass leaves its neutral value, and the row then leaves the fused pass (the rest
    of the decision is checked against the reference in tests/engine/sampler/test_rows.py)."""
    body, engine = ({name: CHANGED[name]}, {}) if name in CHANGED else ({}, {name: ENGINE_FIELDS[name]})
    wire = _to_the_engine(CompletionRequest, body, {"prompt": "x"}, **engine)[1]
    default = _to_the_engine(CompletionRequest, {}, {"prompt": "x"})[1]
    table = RowTable(2)
    table.set([0, 1], [wire, default], [3, 3])
    for f in [f for f in ROW_FIELDS if f.param == name]:
        assert table.host[f.name][0] == f.value(wire, 3), f.name
        if f.stage == KERNEL:  # the kernel reads any value: it must at least differ from the default's
            assert table.host[f.name][0] != table.host[f.name][1], f.name
        else:
            assert table.host[f.name][0] != f.neutral and table.host[f.name][1] == f.neutral, f.name
            assert table.plain(np.array([0, 1])).tolist() == [f.stage == RUNNER, True], f.name


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
        ("allowed_token_ids", []),
        ("allowed_token_ids", [-1]),
        ("bad_words", [""]),
        ("bad_words_token_ids", [[]]),
        ("truncate_prompt_tokens", -2),
        ("truncation_side", "middle"),
        ("priority", 2**63),
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


def test_min_tokens_holds_off_eos_and_stop_token_ids_offline(llm):
    """vLLM's min_tokens: EOS and stop_token_ids cannot end the output before min_tokens tokens; then they
    end it as before. Both are forced by logit_bias, so without min_tokens the output is one token."""
    eos = min(llm.engine.eos_token_ids)
    greedy = {"max_tokens": 8, "temperature": 0.0}
    for stop in (dict(logit_bias={42: 100.0}, stop_token_ids=[42]), dict(logit_bias={eos: 100.0})):
        end = 42 if "stop_token_ids" in stop else eos
        [at_once] = llm.generate_batch(["The sea is"], SamplingParams(**greedy, **stop))
        assert at_once.finish_reason == "stop" and at_once.token_ids == [end], at_once
        [held] = llm.generate_batch(["The sea is"], SamplingParams(**greedy, **stop, min_tokens=4))
        assert held.finish_reason == "stop" and len(held.token_ids) == 5 and held.token_ids[-1] == end, held
        assert end not in held.token_ids[:4]
    with pytest.raises(ValueError, match="min_tokens must be at most max_tokens"):
        SamplingParams(max_tokens=3, min_tokens=4)
    with pytest.raises(ValueError, match="min_tokens cannot be combined with structured_outputs"):
        SamplingParams(min_tokens=1, structured_outputs=StructuredOutputs(regex="a+"))


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


def test_every_token_id_field_is_checked_against_the_vocabulary(server, llm):
    """One check (SamplingParams.token_id_outside) serves the API worker and the engine."""
    from ringllm.engine.engine import RequestError

    r = _post(server, "/v1/completions", {"prompt": "x", "stop_token_ids": [5000]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "stop_token_ids", r.text
    with pytest.raises(RequestError, match="stop_token_ids: token id 5000"):
        llm.generate_batch(["x"], SamplingParams(stop_token_ids=[5000]))


GREEDY = {"max_tokens": 8, "temperature": 0.0, "ignore_eos": True}


def _holds(seq: list[int], part: list[int]) -> bool:
    return any(seq[i : i + len(part)] == part for i in range(len(seq) - len(part) + 1))


def test_allowed_token_ids_and_bad_words_offline(llm):
    """allowed_token_ids keep the output among them; bad words ban the last token of a word where the output
    ends with the rest of it (a two-token sequence: its first token is free, its second not after it, read back
    from the device while the next step is already scheduled); a word as text is tokenized by vLLM's rule."""
    [free] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY))
    [allowed] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY, allowed_token_ids=[7, 42, 99]))
    assert set(allowed.token_ids) <= {7, 42, 99} and allowed.token_ids != free.token_ids
    a, b = free.token_ids[:2]
    [banned] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY, bad_words_token_ids=[[a, b]]))
    assert banned.token_ids[0] == a and banned.token_ids[1] != b and not _holds(banned.token_ids, [a, b])
    # a word of the free output that its rule bans as the output spells it (" An" is one token, "An" two: the
    # spaced spelling of another length is not banned, as in vLLM)
    texts = [llm.tokenizer.decode([t]).strip() for t in free.token_ids]
    words = [t for t in texts if t.isalpha() and len(t) > 1]
    word = next(w for w in words if any(_holds(free.token_ids, s) for s in bad_words_token_ids(llm.tokenizer, [w])))
    sequences = bad_words_token_ids(llm.tokenizer, [word])
    [out] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY, bad_words=[word]))
    assert not any(_holds(out.token_ids, s) for s in sequences) and out.token_ids != free.token_ids


def test_prompt_logprobs_carry_each_prompt_tokens_rank_offline(llm):
    [out] = llm.generate_batch(["The sea is calm tonight"], SamplingParams(**GREEDY, prompt_logprobs=2))
    assert out.prompt_logprobs is not None and out.prompt_ranks is not None
    ids = llm.encode("The sea is calm tonight")
    assert len(out.prompt_logprobs) == len(out.prompt_ranks) == len(ids) - 1
    for token, (lp, top), rank in zip(ids[1:], out.prompt_logprobs, out.prompt_ranks):
        assert (rank == 1) == (token == top[0][0]) and rank >= 1
        assert rank <= 2 or lp < top[-1][1]  # beyond the top 2 only if less likely than both


def test_truncate_prompt_tokens_and_priority_offline(llm):
    from ringllm.engine.engine import RequestError

    ids = llm.encode("The sea is calm tonight, the tide is full")
    [cut] = llm.generate_batch([ids], SamplingParams(**GREEDY, truncate_prompt_tokens=3))
    [tail] = llm.generate_batch([ids[-3:]], SamplingParams(**GREEDY))
    assert cut.prompt_tokens == 3 and cut.token_ids == tail.token_ids
    [whole] = llm.generate_batch([list(range(1, 400))], SamplingParams(**GREEDY, truncate_prompt_tokens=-1))
    assert whole.prompt_tokens == 256 - 8  # the context less max_tokens
    with pytest.raises(ValueError, match="truncate_prompt_tokens"):
        llm.generate_batch([ids], SamplingParams(**GREEDY, truncate_prompt_tokens=250))
    with pytest.raises(RequestError, match="priority"):  # the engine schedules first come, first served
        llm.generate_batch([ids], SamplingParams(**GREEDY, priority=1))


def test_min_tokens_holds_a_stop_string_back_offline(llm):
    [free] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY))
    stop = llm.tokenizer.decode(free.token_ids[1:3])  # ends within the first three tokens' text
    [stopped] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY, stop=[stop]))
    assert stopped.finish_reason == "stop" and len(stopped.text) < len(free.text)
    [held] = llm.generate_batch(["The sea is"], SamplingParams(**GREEDY, stop=[stop], min_tokens=6))
    assert held.text.startswith(llm.tokenizer.decode(free.token_ids[:6]))
