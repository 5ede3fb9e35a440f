"""/v1/completions' serving object over a scripted engine: answers whole and streamed, n and lists of prompts,
stop strings, logprobs, echo, usage, errors naming their field, engine failures, the timeout and a client that
leaves."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest

from ringllm.app.completion import MAX_PROMPT_LOGPROB_ENTRIES, check_prompt_logprob_work
from ringllm.app.errors import ApiError
from ringllm.app.responses import PromptLogprob
from ringllm.app.schemas import CompletionRequest
from ringllm.app.settings import SamplingDefaults
from ringllm.app.sse import sse_stream
from ringllm.ipc import messages as m
from ringllm.text.bad_words import bad_words_token_ids
from tests.app.conftest import collect_frames, never
from tests.app.fake_engine import LOGPROB, PROMPT_LOGPROB, PROMPT_RANK, EngineBusy, EngineDown, delta

TEXT = "Once upon a time there was a function"


def body(**fields) -> CompletionRequest:
    """The body as the route gets it: decoded from JSON."""
    return msgspec.json.decode(
        msgspec.json.encode({"model": "m", "prompt": "The sea", **fields}), type=CompletionRequest
    )


def create(serving, disconnected=never, **fields):
    return asyncio.run(serving.completions.create(body(**fields), "req1", disconnected))


def stream(serving, **fields) -> list:
    async def run():
        return await collect_frames(await serving.completions.create(body(stream=True, **fields), "req1", never))

    return asyncio.run(run())


def test_a_whole_answer(serving):
    tok = serving.model.tokenizer
    r = create(serving, model="other-name", max_tokens=5)
    assert r.id == "cmpl-req1" and r.model == "m" and r.object == "text_completion"  # answers name the first
    [choice] = r.choices
    assert choice.text == tok.decode(tok.encode(TEXT)[:5]) and choice.finish_reason == "length"
    assert r.usage.prompt_tokens == len(tok.encode("The sea", add_special_tokens=True))
    assert r.usage.completion_tokens == 5 and r.usage.total_tokens == r.usage.prompt_tokens + 5
    [(_, ids, sampling)] = serving.engine.submitted
    assert ids == tok.encode("The sea", add_special_tokens=True) and sampling.max_tokens == 5
    assert serving.count("length") == 1


def test_max_tokens_defaults_to_16_within_the_context(build):
    serving = build(max_seq_len=20)
    create(serving, prompt=[1, 2, 3])
    create(serving, prompt=list(range(10)))
    assert [s.max_tokens for _, _, s in serving.engine.submitted] == [16, 10]


def test_the_stream_equals_the_whole_answer_and_ends_with_usage(serving):
    whole = create(serving, max_tokens=40)
    frames = stream(serving, max_tokens=40, stream_options={"include_usage": True})
    assert frames[-1] == "[DONE]"
    usage = frames[-2]
    assert usage["choices"] == [] and usage["usage"]["completion_tokens"] == whole.usage.completion_tokens
    pieces = frames[:-2]
    assert len(pieces) > 3  # one frame per delta the engine sent
    assert "".join(p["choices"][0]["text"] for p in pieces) == whole.choices[0].text
    assert [p["choices"][0]["finish_reason"] for p in pieces][-1] == "stop"
    assert all(p["choices"][0]["finish_reason"] is None for p in pieces[:-1])
    assert all((p["id"] == "cmpl-req1" and "usage" not in p) or p["usage"] is None for p in pieces)


def test_n_choices_of_several_prompts_fan_out_with_their_own_seeds(serving):
    tok = serving.model.tokenizer
    r = create(serving, prompt=["a b", "The sea is calm"], n=2, seed=2**63 - 1, max_tokens=3)
    seeds = [s.seed for _, _, s in serving.engine.submitted]
    assert seeds == [2**63 - 1, -(2**63), 2**63 - 1, -(2**63)]  # seed + j, wrapped within 64 bits
    assert [c.index for c in r.choices] == [0, 1, 2, 3] and all(c.finish_reason == "length" for c in r.choices)
    prompts = len(tok.encode("a b", True)) + len(tok.encode("The sea is calm", True))
    assert r.usage.prompt_tokens == prompts and r.usage.completion_tokens == 12  # each prompt counted once


def test_token_id_prompts_are_sent_as_given(serving):
    r = create(serving, prompt=[[5, 6, 7], [8]], max_tokens=2)
    assert [ids for _, ids, _ in serving.engine.submitted] == [[5, 6, 7], [8]] and r.usage.prompt_tokens == 4


@pytest.mark.parametrize("streamed", [False, True])
def test_a_stop_string_cuts_the_text_and_aborts_the_request_in_the_engine(serving, streamed):
    serving.engine.reply = serving.engine.text_reply(TEXT, hang=True)  # only the stop string ends it
    if streamed:
        frames = stream(serving, stop=["time the", "function"])
        text = "".join(f["choices"][0]["text"] for f in frames[:-1])
        reason = frames[-2]["choices"][0]["finish_reason"]
    else:
        choice = create(serving, stop=["time the", "function"]).choices[0]
        text, reason = choice.text, choice.finish_reason
    assert text == "Once upon a " and reason == "stop"
    [(rid, _, sampling)] = serving.engine.submitted
    assert sampling.stop == ["time the", "function"] and serving.engine.aborted == [rid]
    assert serving.count("stop") == 1


def test_a_request_the_engine_finishes_is_not_aborted(serving):
    create(serving, stop=["not in the text"])
    assert serving.engine.aborted == [] and serving.count("stop") == 1


def test_logprobs_name_each_token_and_its_top_alternatives(serving):
    tok = serving.model.tokenizer
    lp = create(serving, max_tokens=4, logprobs=2).choices[0].logprobs
    ids = tok.encode(TEXT)[:4]
    assert lp.tokens == [tok.decode([t], skip_special_tokens=False) for t in ids]
    assert lp.token_logprobs == [LOGPROB] * 4
    assert lp.top_logprobs == [{tok.decode([t]): LOGPROB} for t in ids]
    assert create(serving, max_tokens=2).choices[0].logprobs is None


@pytest.mark.parametrize("prompt", ["The sea is", [7, 8, 9]])
def test_echo_puts_the_prompt_and_its_logprobs_first(serving, prompt):
    tok = serving.model.tokenizer
    choice = create(serving, prompt=prompt, echo=True, logprobs=1, max_tokens=3).choices[0]
    prompt_ids = tok.encode(prompt, True) if isinstance(prompt, str) else prompt
    echoed = prompt if isinstance(prompt, str) else tok.decode(prompt)
    assert choice.text == echoed + tok.decode(tok.encode(TEXT)[:3])
    n = len(prompt_ids)
    assert choice.logprobs.token_logprobs == [None] + [PROMPT_LOGPROB] * (n - 1) + [LOGPROB] * 3
    assert choice.logprobs.top_logprobs[0] is None and len(choice.logprobs.tokens) == n + 3
    assert serving.engine.submitted[0][2].prompt_logprobs == 1


def test_top_logprobs_hold_the_sampled_token_besides_the_top_k(serving):
    """As OpenAI and vLLM: logprobs 0 gives each token's own logprob in top_logprobs (not an empty map), and a
    sampled token outside the top k is there too, first (k + 1 entries at most)."""
    tok = serving.model.tokenizer
    ids = tok.encode(TEXT)[:3]
    lp = create(serving, max_tokens=3, logprobs=0).choices[0].logprobs
    assert lp.top_logprobs == [{tok.decode([t]): LOGPROB} for t in ids]
    likelier = tok.encode(" sea")[0]

    def reply(prompt, sampling):
        items = [delta([t], sampling) for t in ids]
        for item in items:
            item.top_logprobs = [[(likelier, -0.1)]]
        items[-1].finish_reason = "length"
        return items

    serving.engine.reply = reply
    lp = create(serving, max_tokens=3, logprobs=1).choices[0].logprobs
    assert [list(top.items()) for top in lp.top_logprobs] == [
        [(tok.decode([t]), LOGPROB), (tok.decode([likelier]), -0.1)] for t in ids
    ]


def test_prompt_logprobs_come_back_in_vllms_shape(serving):
    """vLLM's prompt_logprobs, at the choice: None for the first prompt token, then for each a map from token id
    to its logprob, rank and text (the prompt token's own and the top k); only where the request asked."""
    tok = serving.model.tokenizer
    r = create(serving, prompt="The sea is", prompt_logprobs=2, max_tokens=2)
    ids = tok.encode("The sea is", True)
    assert serving.engine.submitted[0][2].prompt_logprobs == 2
    want = [None] + [{t: PromptLogprob(PROMPT_LOGPROB, PROMPT_RANK, tok.decode([t]))} for t in ids[1:]]
    assert r.choices[0].prompt_logprobs == want
    encoded = json.loads(msgspec.json.encode(r))["choices"][0]
    assert encoded["prompt_logprobs"][1] == {
        str(ids[1]): {"logprob": PROMPT_LOGPROB, "rank": PROMPT_RANK, "decoded_token": tok.decode([ids[1]])}
    }
    assert json.loads(msgspec.json.encode(create(serving)))["choices"][0]["prompt_logprobs"] is None  # as vLLM
    # with echo the engine computes as many top logprobs as either asks
    create(serving, echo=True, logprobs=1, prompt_logprobs=3, max_tokens=2)
    assert serving.engine.submitted[-1][2].prompt_logprobs == 3
    with pytest.raises(ApiError) as e:  # as vLLM: a stream has no place for them
        stream(serving, prompt_logprobs=1)
    assert e.value.param == "prompt_logprobs"


def test_truncate_prompt_tokens_keeps_the_last_tokens_or_the_first(build):
    serving = build(max_seq_len=40)
    tok = serving.model.tokenizer
    ids = tok.encode("The sea is calm tonight, the tide is full", True)
    r = create(serving, prompt="The sea is calm tonight, the tide is full", truncate_prompt_tokens=4, echo=True)
    assert serving.engine.submitted[-1][1] == ids[-4:] and r.usage.prompt_tokens == 4
    assert r.choices[0].text.startswith(tok.decode(ids[-4:]))  # the echo is the prompt the model saw
    create(serving, prompt=ids, truncate_prompt_tokens=3, truncation_side="right")
    assert serving.engine.submitted[-1][1] == ids[:3]
    create(serving, prompt=list(range(1, 60)), truncate_prompt_tokens=-1, max_tokens=10)  # the context less 10
    assert serving.engine.submitted[-1][1] == list(range(30, 60))
    long = "x" * (serving.model.max_text_chars + 1)  # too long for the context, unless truncated
    create(serving, prompt=long, truncate_prompt_tokens=-1)
    assert len(serving.engine.submitted[-1][1]) == 40 - 16  # beside the default 16 tokens
    for fields in ({"truncate_prompt_tokens": 31, "max_tokens": 10}, {"truncate_prompt_tokens": 0}):
        with pytest.raises(ApiError) as e:
            create(serving, **fields)
        assert e.value.param == "truncate_prompt_tokens", e.value.message


def test_min_tokens_holds_stop_strings_back(serving):
    tok = serving.model.tokenizer
    assert create(serving, stop=["upon"], max_tokens=40).choices[0].text == "Once "
    r = create(serving, stop=["upon"], max_tokens=40, min_tokens=len(tok.encode("Once upon")))
    assert r.choices[0].text == TEXT


def test_bad_words_reach_the_engine_as_token_sequences(serving):
    tok = serving.model.tokenizer
    create(serving, bad_words=["a", "time"], max_tokens=2)
    sampling = serving.engine.submitted[-1][2]
    assert sampling.bad_words == ["a", "time"]
    assert sampling.bad_words_token_ids == bad_words_token_ids(tok, ["a", "time"])


@pytest.mark.parametrize(
    "fields,status,param",
    [
        ({"model": "nope"}, 404, "model"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": []}, 400, "prompt"),
        ({"prompt": ["a", [1]]}, 400, "prompt"),
        ({"prompt": ["a"] * 65}, 400, "prompt"),
        ({"prompt": [1] * 1024}, 400, "prompt"),  # no room left in the context
        ({"prompt": [5000]}, 400, "prompt"),  # out of vocabulary
        ({"max_tokens": 1023}, 400, "max_tokens"),
        ({"stop_token_ids": [5000]}, 400, "stop_token_ids"),
        ({"logit_bias": {"5000": 1}}, 400, "logit_bias"),
        ({"best_of": 3}, 400, "best_of"),
        ({"stream_options": {"include_obfuscation": True}}, 400, "include_obfuscation"),
        ({"guided_json": "[1, 2]"}, 400, "guided_json"),
        ({"guided_regex": "a", "guided_choice": ["x"]}, 400, "guided_regex"),
        ({"response_format": {"type": "json_schema", "json_schema": {"schema": {"type": 5}}}}, 400, "response_format"),
        ({"n": 3, "prompt": ["a", "b"]}, 400, "n"),  # 6 generations, a queue of 5
        ({"allowed_token_ids": [1, 5000]}, 400, "allowed_token_ids"),
        ({"bad_words": [" "]}, 400, "bad_words"),
        ({"use_beam_search": True}, 400, "use_beam_search"),
        ({"length_penalty": 0.5}, 400, "length_penalty"),
        ({"prompt_embeds": "AAAA"}, 400, "prompt_embeds"),  # not served: refused, not ignored
    ],
)
def test_errors_name_the_field(build, fields, status, param):
    serving = build(max_waiting_requests=5)
    with pytest.raises(ApiError) as e:
        create(serving, **fields)
    assert (e.value.status, e.value.param) == (status, param), e.value.message
    assert serving.engine.submitted == []


def test_an_empty_prompt_is_refused_in_vllms_words(serving):
    for fields in ({"prompt": ""}, {"prompt": "", "prompt_embeds": []}, {"prompt": []}):
        with pytest.raises(ApiError, match="Either prompt or prompt_embeds must be provided and non-empty.") as e:
            create(serving, **fields)
        assert (e.value.status, e.value.param) == (400, "prompt")
    assert create(serving, prompt_embeds=[], max_tokens=1).choices  # empty embeddings ask for nothing
    with pytest.raises(ApiError, match="out of vocabulary"):
        create(serving, prompt=[999999])


def test_a_text_longer_than_the_context_can_hold_is_refused_before_tokenizing(serving):
    with pytest.raises(ApiError, match="characters") as e:
        create(serving, prompt="x" * (serving.model.max_text_chars + 1))
    assert e.value.param == "prompt"


def test_a_request_the_engine_fails_gets_its_status(serving):
    serving.engine.reply = lambda ids, sampling: [m.RequestFailed("", "the grammar does not compile", 400)]
    with pytest.raises(ApiError, match="grammar") as e:
        create(serving)
    assert e.value.status == 400 and serving.engine.aborted == []
    # Issue 27 item 11: the client's grammar is not a request that ran, so no finish reason counts it.
    assert [serving.count(r) for r in ("stop", "length", "abort", "error")] == [0, 0, 0, 0]


@pytest.mark.parametrize("refusal", [EngineDown("the engine is not running"), EngineBusy("its ring stayed full")])
def test_an_engine_that_cannot_take_the_request_is_a_503(serving, refusal):
    serving.engine.refuse = refusal
    with pytest.raises(ApiError) as e:
        create(serving)
    assert e.value.status == 503 and e.value.kind == "server_error" and str(refusal) in e.value.message


def test_the_request_timeout_is_a_504_and_aborts(build):
    serving = build(request_timeout=0.05)
    serving.engine.reply = serving.engine.text_reply(TEXT, hang=True)
    with pytest.raises(ApiError, match="request timeout of 0.05 s") as e:
        create(serving)
    assert e.value.status == 504 and serving.engine.aborted == ["fake-0"] and serving.count("abort") == 1


def test_a_client_that_leaves_aborts_every_choice(serving):
    serving.engine.reply = serving.engine.text_reply(TEXT, hang=True)

    async def leaves() -> None:
        await asyncio.sleep(0.05)

    with pytest.raises(ApiError) as e:
        create(serving, disconnected=leaves, n=2)
    assert e.value.status == 499 and sorted(serving.engine.aborted) == ["fake-0", "fake-1"]


def test_a_stream_the_client_leaves_aborts_its_choices(serving):
    serving.engine.reply = serving.engine.text_reply(TEXT, hang=True)

    async def run():
        frames = await serving.completions.create(body(stream=True, n=2), "req1", never)
        await anext(frames)
        await frames.aclose()  # what a disconnect does to the response's stream

    asyncio.run(run())
    assert sorted(serving.engine.aborted) == ["fake-0", "fake-1"]


def test_a_failure_after_the_stream_started_is_its_last_event(serving):
    tok = serving.model.tokenizer
    first = tok.encode(TEXT)[:2]
    serving.engine.reply = lambda ids, sampling: [
        m.TokenDelta("", m.pack_ids(first)),
        m.RequestFailed("", "engine failure: it died", 503),
    ]

    async def run():
        return await collect_frames(sse_stream(await serving.completions.create(body(stream=True), "r", never)))

    frames = asyncio.run(run())
    assert frames[0]["choices"][0]["text"] == tok.decode(first)
    assert frames[-1]["error"] == {
        "message": "engine failure: it died",
        "type": "server_error",
        "param": None,
        "code": None,
    }


@pytest.mark.parametrize(
    "options", [{"include_usage": None}, {"include_usage": True}, {"continuous_usage_stats": True}]
)
def test_stream_options_without_stream_is_a_400(serving, options):
    with pytest.raises(ApiError) as e:  # as OpenAI and vLLM, whatever the options
        create(serving, stream_options=options)
    assert (e.value.status, e.value.param) == (400, "stream_options")
    assert "stream=True" in e.value.message and serving.engine.submitted == []


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(serving):
    frames = stream(serving, max_tokens=5, stream_options={"include_usage": True, "continuous_usage_stats": True})
    assert frames[-1] == "[DONE]"
    pieces, final = frames[:-2], frames[-2]
    prompt = final["usage"]["prompt_tokens"]
    assert [p["usage"]["completion_tokens"] for p in pieces] == [1, 2, 3, 4, 5]
    assert all(p["usage"]["prompt_tokens"] == prompt for p in pieces)
    assert final["choices"] == [] and final["usage"]["completion_tokens"] == 5
    without = stream(serving, max_tokens=5, stream_options={"include_usage": False, "continuous_usage_stats": True})
    assert all(f == "[DONE]" or f.get("usage") is None for f in without)


def test_with_logprobs_tokens_that_arrive_together_stream_one_chunk_each(serving):
    # A busy worker reads several of the engine's deltas at once. With logprobs each token is still its own chunk
    # (as vLLM streams them): its logprobs, its text ("" while a character is incomplete) and the usage so far.
    tok = serving.model.tokenizer
    ids = tok.encode("The sea \u2603 is")  # the snowman is three byte tokens
    serving.engine.reply = lambda prompt, sampling: [delta(ids, sampling, "stop")]
    usage = {"include_usage": True, "continuous_usage_stats": True}
    frames = stream(serving, max_tokens=20, logprobs=1, stream_options=usage)[:-2]
    assert [f["usage"]["completion_tokens"] for f in frames] == list(range(1, len(ids) + 1))
    assert [f["choices"][0]["logprobs"]["tokens"] for f in frames] == [[tok.decode([i])] for i in ids]
    texts = [f["choices"][0]["text"] for f in frames]
    assert texts == ["The", " sea", " ", "", "", "\u2603", " is"] and "".join(texts) == "The sea \u2603 is"
    assert [f["choices"][0]["finish_reason"] for f in frames] == [None] * (len(ids) - 1) + ["stop"]
    [whole] = stream(serving, max_tokens=20, stream_options=usage)[:-2]  # without logprobs: one piece
    assert whole["choices"][0]["text"] == "The sea \u2603 is" and whole["usage"]["completion_tokens"] == len(ids)


def test_a_stop_string_inside_tokens_that_arrived_together_ends_the_stream_there(serving):
    tok = serving.model.tokenizer
    ids = tok.encode("The sea is calm")
    serving.engine.reply = lambda prompt, sampling: [delta(ids, sampling)]  # the engine would go on
    frames = stream(serving, max_tokens=20, logprobs=0, stop=[" is"])[:-1]
    assert "".join(f["choices"][0]["text"] for f in frames) == "The sea"
    assert frames[-1]["choices"][0]["finish_reason"] == "stop" and len(serving.engine.aborted) == 1


def test_the_models_generation_config_fills_only_what_the_request_leaves_unset(build):
    serving = build(sampling_defaults=SamplingDefaults(temperature=0.3, top_k=20, repetition_penalty=1.1, max_tokens=7))
    create(serving)
    create(serving, temperature=None, top_k=None, max_tokens=None)  # null is unset
    create(serving, temperature=1.0, top_k=-1, repetition_penalty=1.0, max_tokens=10)  # set, even to the default
    create(serving, max_tokens=None, prompt=[1] * 1020)  # the room left is less than the model's default
    got = [(s.temperature, s.top_k, s.repetition_penalty, s.max_tokens) for _, _, s in serving.engine.submitted]
    assert got == [(0.3, 20, 1.1, 7), (0.3, 20, 1.1, 7), (1.0, -1, 1.0, 10), (0.3, 20, 1.1, 4)]
    assert serving.engine.submitted[0][2].top_p == 1.0  # no model default: the contract's


def test_return_token_ids_gives_the_prompts_and_the_completions_ids(serving):
    tok = serving.model.tokenizer
    prompt = tok.encode("The sea", add_special_tokens=True)
    r = create(serving, max_tokens=5, return_token_ids=True)
    assert r.choices[0].prompt_token_ids == prompt
    assert r.choices[0].token_ids == tok.encode(TEXT)[:5]
    plain = json.loads(msgspec.json.encode(create(serving, max_tokens=5)))["choices"][0]
    assert plain["prompt_token_ids"] is None and plain["token_ids"] is None  # vLLM's keys, always there
    frames = stream(serving, max_tokens=5, return_token_ids=True)[:-1]
    assert frames[0]["choices"][0]["prompt_token_ids"] == prompt
    assert all("prompt_token_ids" not in f["choices"][0] for f in frames[1:])
    assert [x for f in frames for x in f["choices"][0]["token_ids"]] == tok.encode(TEXT)[:5]
    assert all("token_ids" not in f["choices"][0] for f in stream(serving, max_tokens=5)[:-1])


@pytest.mark.parametrize("server_option", [False, True])
def test_return_tokens_as_token_ids_names_tokens_by_id(build, server_option):
    serving = build(return_tokens_as_token_ids=server_option)
    ask = {} if server_option else {"return_tokens_as_token_ids": True}
    r = create(serving, max_tokens=3, logprobs=1, **ask)
    ids = serving.model.tokenizer.encode(TEXT)[:3]
    lp = r.choices[0].logprobs
    assert lp.tokens == [f"token_id:{t}" for t in ids]
    assert [next(iter(top)) for top in lp.top_logprobs] == lp.tokens  # the sampled token first
    if server_option:  # a request may still ask for text
        r = create(serving, max_tokens=3, logprobs=1, return_tokens_as_token_ids=False)
        assert not r.choices[0].logprobs.tokens[0].startswith("token_id:")


def test_text_offset_counts_each_tokens_place_in_the_text(serving):
    for echo in (False, True):
        lp = create(serving, max_tokens=6, logprobs=0, echo=echo).choices[0].logprobs
        assert lp.text_offset == [sum(map(len, lp.tokens[:i])) for i in range(len(lp.tokens))]
        assert len(lp.text_offset) == len(lp.tokens) > 0
    frames = stream(serving, max_tokens=6, logprobs=0)[:-1]
    offsets = [x for f in frames for x in f["choices"][0]["logprobs"]["text_offset"]]
    tokens = [x for f in frames for x in f["choices"][0]["logprobs"]["tokens"]]
    assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]  # from the text sent before


def test_usage_reports_the_prompt_tokens_the_prefix_cache_served(build):
    assert create(build(), max_tokens=2).usage.prompt_tokens_details is None  # as vLLM, only when asked
    serving = build(enable_prompt_tokens_details=True)
    text_reply = serving.engine.reply

    def cached_reply(ids, sampling):
        items = text_reply(ids, sampling)
        items[0].cached_tokens = len(ids) - 1  # the engine says so with the first token
        return items

    serving.engine.reply = cached_reply
    r = create(serving, prompt=["a b c", "The sea is calm"], n=2, max_tokens=2)
    prompts = [len(serving.model.tokenizer.encode(p, add_special_tokens=True)) for p in ("a b c", "The sea is calm")]
    assert r.usage.prompt_tokens == sum(prompts)
    assert r.usage.prompt_tokens_details.cached_tokens == sum(prompts) - 2  # each prompt once, whatever n
    final = stream(serving, max_tokens=2, stream_options={"include_usage": True})[-2]
    assert final["usage"]["prompt_tokens_details"]["cached_tokens"] == final["usage"]["prompt_tokens"] - 1


def test_prompt_logprob_work_past_its_bound_is_a_400_before_any_work(build):
    """Issue 28: echo + logprobs over many long prompts and a large n made one answer hundreds of megabytes. The
    prompt-logprob entries a request asks for (each prompt token's own and its top k, for every choice of every
    prompt) are bounded by MAX_PROMPT_LOGPROB_ENTRIES: past it a 400, with nothing sent to the engine."""
    serving = build(max_seq_len=4096, max_waiting_requests=1024)
    prompts = [[7] * 4000 for _ in range(64)]  # 64 × 3,999 scored positions
    assert 64 * 3999 * 2 <= MAX_PROMPT_LOGPROB_ENTRIES < 2 * 64 * 3999 * 2
    for fields, param in [
        ({"echo": True, "logprobs": 1, "n": 2}, "echo"),  # the token and its top 1, twice over
        ({"prompt_logprobs": 1, "n": 2}, "prompt_logprobs"),
        ({"echo": True, "logprobs": 0, "prompt_logprobs": 3}, "echo"),  # the larger k counts
    ]:
        with pytest.raises(ApiError, match="at most 524288") as e:
            create(serving, prompt=prompts, max_tokens=1, **fields)
        assert (e.value.status, e.value.param) == (400, param)
    assert serving.engine.submitted == []
    # within the bound: the same prompts once, or without prompt logprobs at any n
    check_prompt_logprob_work(prompts, 1, 1, "echo")
    check_prompt_logprob_work(prompts, 16, None, "echo")
    create(serving, prompt=[[7] * 100] * 2, max_tokens=1, echo=True, logprobs=1, n=2)
    assert len(serving.engine.submitted) == 4
