"""Structured outputs (engine/grammar.py, xgrammar) on CPU: the demo model and a tiny Llama checkpoint with the
demo tokenizer, through the offline API, the engine itself and the server. Random weights make the model
write anything the grammar allows, which is what these tests need: every output must still fit."""

import json
import shutil

import httpx
import jsonschema_rs
import msgspec
import pytest

from ringllm.engine import LLM, EngineConfig, SamplingParams
from ringllm.engine.demo import demo_model_path
from ringllm.engine.engine import Engine, RequestError
from ringllm.ipc.sampling import StructuredOutputs
from ringllm.text.chat_template import chat_prompt_ids
from tests.helpers import start_server, stop_server, tiny_checkpoint

# Nested objects, enums, arrays and bounded scalars: a bounded schema, so that every output ends well within
# max_tokens (whitespace between elements is bounded by the engine too).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "owner": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ok", "age"],
            "properties": {"ok": {"type": "boolean"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}
PROMPTS = ["The sea is", "Hello", "{", "Once upon a time"]


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def llm(demo_path):
    with LLM(model=str(demo_path), device="cpu", kv_cache_tokens=8192, context_len=512) as llm:
        yield llm


def _closing_bias(tok) -> dict[int, float]:
    """Makes '"' and '}' likely, so that the random model's free-form strings and objects end soon."""
    return {tok.token_to_id('"'): 8.0, tok.token_to_id("}"): 8.0}


def test_json_object_output_always_parses(llm):
    so = StructuredOutputs(json_object=True)
    params = [
        SamplingParams(
            max_tokens=256, temperature=1.0, seed=s, structured_outputs=so, logit_bias=_closing_bias(llm.tokenizer)
        )
        for s in range(6)
    ]
    for out in llm.generate_batch(PROMPTS[:3] * 2, params):
        assert out.finish_reason == "stop", out
        assert isinstance(json.loads(out.text), dict), out.text


@pytest.mark.parametrize("compact", [False, True])
def test_json_schema_output_always_validates(llm, compact):
    so = StructuredOutputs(json=SCHEMA, disable_any_whitespace=compact)
    params = [SamplingParams(max_tokens=400, temperature=1.0, seed=s, structured_outputs=so) for s in range(8)]
    for out in llm.generate_batch(PROMPTS * 2, params):
        assert out.finish_reason == "stop", out
        jsonschema_rs.validate(SCHEMA, json.loads(out.text))
        if compact:
            assert out.text == json.dumps(json.loads(out.text), ensure_ascii=False), out.text


def test_json_strings_hold_only_json_characters(llm):
    """xgrammar 0.2.9 lets raw control characters into length-bounded strings and UTF-8 encoded surrogates into
    every string; engine/grammar.py patches both out of the grammar."""
    import xgrammar

    schema = {
        "type": "object",
        "properties": {"s": {"type": "string", "maxLength": 5}, "t": {"type": "string"}},
        "required": ["s", "t"],
        "additionalProperties": False,
    }
    compiled = llm.engine.grammars.compile(StructuredOutputs(json=schema)).result()

    def accepts(text: bytes) -> bool:
        matcher = xgrammar.GrammarMatcher(compiled)
        return matcher.accept_string(text) and matcher.is_completed()

    assert accepts('{"s": "ok", "t": "é😀 \\n"}'.encode())
    for bad in (
        b'{"s": "\x0e", "t": ""}',
        b'{"s": "", "t": "\x01"}',
        b'{"s": "\xed\xa0\x80", "t": ""}',
        b'{"s": "", "t": "\xed\xb0\x80"}',
    ):
        assert not accepts(bad), bad


def test_regex_choice_and_grammar(llm):
    import re

    regex = StructuredOutputs(regex=r"[a-z]{3}-[0-9]{2}")
    choice = StructuredOutputs(choice=["yes", "no", 'say "maybe"'])
    grammar = StructuredOutputs(grammar='root ::= "(" num ("+" num)* ")"\nnum ::= [1-9] [0-9]?')
    for so, check in [
        (regex, lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2}", t)),
        (choice, choice.choice.__contains__),
        (grammar, lambda t: re.fullmatch(r"\([1-9][0-9]?(\+[1-9][0-9]?)*\)", t)),
    ]:
        params = [SamplingParams(max_tokens=200, temperature=1.0, seed=s, structured_outputs=so) for s in range(6)]
        for out in llm.generate_batch(PROMPTS[:3] * 2, params):
            assert out.finish_reason == "stop" and check(out.text), (so.kind, out)


def test_a_complete_grammar_ends_the_request_even_with_ignore_eos(llm):
    so = StructuredOutputs(choice=["yes", "no"])
    [out] = llm.generate_batch(
        ["x"], SamplingParams(max_tokens=50, temperature=0.0, ignore_eos=True, structured_outputs=so)
    )
    assert out.finish_reason == "stop" and out.text in ("yes", "no")


@pytest.mark.parametrize(
    "so",
    [
        StructuredOutputs(regex="(?<=a)b"),
        StructuredOutputs(grammar="root ::= nothing"),
        StructuredOutputs(json={"type": "object", "properties": {"a": {"$ref": "#/nope"}}}),
    ],
)
def test_a_constraint_that_does_not_compile_is_refused_before_it_queues(llm, so):
    with pytest.raises(RequestError, match=f"structured_outputs.{so.kind}"):
        llm.generate_batch(["x"], SamplingParams(structured_outputs=so))


# ---- batching: constrained rows do not change the others, whatever the overlap ----
@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory, demo_path):
    path = tiny_checkpoint("llama", tmp_path_factory.mktemp("tiny"), vocab=1024)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo_path / name, path / name)
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "eos_token_id": 2}))
    return path


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    out = {f"r{i}": [] for i in range(len(requests))}
    for i, (ids, params) in enumerate(requests):
        engine.add_request(f"r{i}", ids, params)
    for _ in range(5000):
        if not engine.has_work:
            break
        for o in engine.step():
            assert o.error is None, o.error
            if o.token_id is not None:
                out[o.rid].append(o.token_id)
    assert not engine.has_work
    return list(out.values())


@pytest.mark.parametrize("model", ["demo", "tiny_llama"])
@pytest.mark.parametrize("overlap", [True, False])
def test_constrained_and_unconstrained_batched_get_what_they_get_alone(request, model, overlap):
    path = request.getfixturevalue("demo_path" if model == "demo" else model)
    engine = Engine(
        EngineConfig(
            model=str(path), device="cpu", kv_cache_tokens=4096, context_len=512, disable_overlap_schedule=not overlap
        )
    )
    try:
        schema = StructuredOutputs(json=SCHEMA, disable_any_whitespace=True)
        requests = [
            ([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)),
            ([9, 10], SamplingParams(temperature=0.0, max_tokens=200, structured_outputs=schema)),
            ([5, 6, 7], SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3)),
            (
                [11],
                SamplingParams(
                    temperature=0.0, max_tokens=40, structured_outputs=StructuredOutputs(regex=r"[a-z]{2,30}")
                ),
            ),
        ]
        alone = [_run(engine, [r])[0] for r in requests]
        together = _run(engine, requests)
        assert together == alone
    finally:
        engine.close()


def test_a_request_aborted_while_its_grammar_compiles_leaves_nothing_behind(demo_path):
    engine = Engine(EngineConfig(model=str(demo_path), device="cpu", kv_cache_tokens=4096, context_len=512))
    try:
        so = StructuredOutputs(regex=r"[a-z]{1,9}")
        engine.add_request("gone", [5, 6], SamplingParams(structured_outputs=so))
        assert engine.stats()["waiting"] == 1
        out = engine.abort("gone")
        assert out is not None and out.finish_reason == "abort"
        assert not engine.has_work and engine.stats()["waiting"] == 0
        assert _run(engine, [([5, 6], SamplingParams(max_tokens=5, structured_outputs=so))])[0]  # still serves
    finally:
        engine.close()


# ---- through the server ----
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, base = start_server(
        tmp_path_factory.mktemp("structured"), "--kv-cache-tokens", "8192", "--context-len", "1024"
    )
    yield base
    stop_server(proc)


def test_official_client_parse_returns_a_parsed_object(server):
    from typing import Literal

    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Owner(BaseModel):
        ok: bool
        age: int = Field(ge=0, le=120)

    class Pet(BaseModel):
        name: str = Field(max_length=12)
        kind: Literal["cat", "dog", "bird"]
        owner: Owner

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    for seed in range(2):
        completion = client.chat.completions.parse(
            model=client.models.list().data[0].id,
            response_format=Pet,
            temperature=1.0,
            seed=seed,
            max_tokens=400,
            messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        )
        pet = completion.choices[0].message.parsed
        assert completion.choices[0].finish_reason == "stop" and isinstance(pet, Pet), completion


@pytest.mark.parametrize(
    "path,body,stream",
    [
        ("/v1/completions", {"prompt": "A pet:"}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A pet?"}]}, True),
    ],
)
def test_response_format_json_schema_on_completions_and_chat(server, path, body, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for seed in range(2):
        r = httpx.post(
            server + path,
            json={**body, "response_format": fmt, "seed": seed, "max_tokens": 400, "stream": stream},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        jsonschema_rs.validate(SCHEMA, json.loads(_text(r, stream)))


def _text(r, stream: bool) -> str:
    if not stream:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        return choice["text"] if "text" in choice else choice["message"]["content"]
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return text


def test_vllm_names_constrain_too(server):
    for extra, check in [
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ({"guided_regex": "[0-9]{4}"}, lambda t: len(t) == 4 and t.isdigit()),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ]:
        r = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 20, **extra}, timeout=60)
        assert r.status_code == 200 and check(r.json()["choices"][0]["text"]), (extra, r.text)


@pytest.mark.parametrize(
    "body,field",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format",
        ),
        ({"guided_json": "not json"}, "guided_json"),
        ({"guided_regex": "(?<=a)b"}, "regex"),  # passes the API worker, refused by the engine's compiler
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided"),
        ({"guided_choice": []}, "guided_choice"),  # built by the API worker: its bounds are checked there too
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ],
)
def test_bad_constraints_are_400(server, body, field):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x", **body}, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200


def test_structured_outputs_travel_whole_on_the_wire():
    from ringllm.ipc import messages as m

    params = SamplingParams(structured_outputs=StructuredOutputs(json=SCHEMA, disable_any_whitespace=True))
    back = msgspec.msgpack.decode(m.encode(m.Generate("r", m.pack_ids([1]), params)), type=m.Generate).sampling
    assert back.structured_outputs == params.structured_outputs and json.loads(back.structured_outputs.json) == SCHEMA


# ---- the real model (tests/real_model.py): a trained model's byte-level BPE of 151k tokens ----
@pytest.fixture(scope="module")
def real_llm(real_model):
    with LLM(model=str(real_model), device="cpu", kv_cache_tokens=4096, context_len=1024) as llm:
        yield llm


@pytest.mark.timeout(1200)
def test_real_model_schema_and_logit_bias(real_llm):
    schema = {
        "type": "object",
        "additionalProperties": False,
        "required": ["name", "kind", "age"],
        "properties": {
            "name": {"type": "string", "maxLength": 20},
            "kind": {"enum": ["cat", "dog"]},
            "age": {"type": "integer", "minimum": 0, "maximum": 30},
        },
    }
    messages = [{"role": "user", "content": "Describe a pet as JSON with name, kind and age."}]
    prompt = chat_prompt_ids(real_llm.tokenizer, messages)
    outs = real_llm.generate_batch(
        [prompt] * 2,
        [
            SamplingParams(max_tokens=80, temperature=1.0, seed=s, structured_outputs=StructuredOutputs(json=schema))
            for s in range(2)
        ],
    )
    for out in outs:
        assert out.finish_reason == "stop", out
        jsonschema_rs.validate(schema, json.loads(out.text))
    greedy = {"max_tokens": 3, "temperature": 0.0, "ignore_eos": True}
    [free] = real_llm.generate_batch([prompt], SamplingParams(**greedy))  # the model opens a ```json block
    [banned] = real_llm.generate_batch([prompt], SamplingParams(**greedy, logit_bias={free.token_ids[0]: -100}))
    assert banned.token_ids[0] != free.token_ids[0]
    cat = real_llm.tokenizer.encode(" cat")[0]
    [forced] = real_llm.generate_batch([prompt], SamplingParams(**greedy, logit_bias={cat: 100}))
    assert forced.token_ids == [cat] * 3
