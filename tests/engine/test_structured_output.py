"""Structured outputs (engine/grammar.py, xgrammar) on CPU through the offline API and the engine itself: the
demo model, a tiny Llama checkpoint with the demo tokenizer and the real model (tests/real_model.py). Random
weights make the model write anything the grammar allows, which is what these tests need: every output must
still fit. Through the server: tests/e2e/test_structured_output.py."""

import json
import shutil

import jsonschema_rs
import pytest

from ringllm.engine import LLM, EngineConfig, SamplingParams
from ringllm.engine.demo import demo_model_path
from ringllm.engine.engine import Engine, RequestError
from ringllm.ipc.sampling import StructuredOutputs
from ringllm.text.chat_template import chat_prompt_ids
from tests.helpers import tiny_checkpoint

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
