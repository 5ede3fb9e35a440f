"""engine/grammar.py and engine/grammar_schema.py on the CPU engine (the demo model): the hardening of issue 28's
structured-output attacks. Each test reproduces an attack and checks the bound that stops it."""

import pytest

from ringllm.engine import EngineConfig, SamplingParams
from ringllm.engine.demo import demo_model_path
from ringllm.engine.engine import Engine, RequestError
from ringllm.engine.grammar import Grammars
from ringllm.engine.grammar_schema import MAX_GRAMMAR_BYTES
from ringllm.ipc.sampling import StructuredOutputs
from ringllm.text.tokenizer import transformers_tokenizer

AMBIGUOUS = 's ::= "a" s | s "a" | s s | "a"\nroot ::= s'


@pytest.fixture(scope="module")
def demo_path(tmp_path_factory):
    return demo_model_path(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def engine(demo_path):
    engine = Engine(EngineConfig(model=str(demo_path), device="cpu", kv_cache_tokens=4096, context_len=1024))
    yield engine
    engine.close()


def _run(engine: Engine, requests: dict[str, tuple[list[int], SamplingParams]]) -> dict[str, list]:
    """Each request's outputs, run to their end."""
    outs: dict[str, list] = {rid: [] for rid in requests}
    for rid, (ids, params) in requests.items():
        engine.add_request(rid, ids, params)
    for _ in range(5000):
        if not engine.has_work:
            break
        for o in engine.step():
            outs[o.rid].append(o)
    assert not engine.has_work
    return outs


def test_the_cache_is_bounded_by_bytes(demo_path):
    """Issue 28, critical 3: distinct large regexes (thousands of alternatives) each cost megabytes compiled;
    the cache keeps only as many as fit its bytes, whatever their count."""
    grammars = Grammars(lambda: transformers_tokenizer(demo_path), 1024, [2], cache_bytes=512 * 1024)
    try:
        regexes = ["(" + "|".join(f"{k}x{i:05d}" for i in range(2000)) + ")" for k in "abcdef"]
        sizes = []
        for regex in regexes:
            compiled = grammars.compile(StructuredOutputs(regex=regex)).result()
            sizes.append(compiled.memory_size_bytes)
            assert grammars.cache_size <= grammars.cache_bytes
        assert min(sizes) > 128 * 1024  # each one is large: the 256 entries of a count would hold them all
        assert grammars.num_compiles == 6
        grammars.compile(StructuredOutputs(regex=regexes[-1])).result()  # the newest is still cached
        assert grammars.num_compiles == 6
        grammars.compile(StructuredOutputs(regex=regexes[0])).result()  # the oldest was dropped
        assert grammars.num_compiles == 7 and grammars.cache_size <= grammars.cache_bytes
    finally:
        grammars.close()


def test_a_fan_out_compiles_its_grammar_once(engine):
    so = StructuredOutputs(regex=r"[a-z]{1,7}-fan")
    before = engine.grammars.num_compiles
    outs = _run(
        engine, {f"f{i}": ([5, 6, i + 7], SamplingParams(max_tokens=20, structured_outputs=so)) for i in range(16)}
    )
    assert engine.grammars.num_compiles == before + 1
    assert all(o[-1].finish_reason == "stop" for o in outs.values())


@pytest.mark.parametrize(
    "schema,keyword",
    [
        ({"type": "array", "uniqueItems": True}, "uniqueItems"),
        ({"type": "object", "properties": {"a": {"not": {"type": "string"}}}}, "not"),
        ({"if": {"type": "string"}, "then": {"maxLength": 3}, "else": {"type": "integer"}}, "if"),
        ({"type": "object", "properties": {"a": {"$ref": "https://example.com/s.json"}}}, "$ref"),
        ({"anyOf": [{"type": "array", "items": {"type": "array", "uniqueItems": 1}}]}, "uniqueItems"),
    ],
)
def test_unenforced_schema_keywords_are_refused_by_name(engine, schema, keyword):
    so = StructuredOutputs(json=schema)
    with pytest.raises(RequestError, match=f"structured_outputs.json: .*{keyword.replace('$', '[$]')}"):
        engine.add_request("kw", [5, 6], SamplingParams(structured_outputs=so))
    assert "kw" not in engine.seqs and not engine.has_work


def test_keywords_as_property_names_and_local_refs_are_fine(engine):
    schema = {
        "type": "object",
        "properties": {"not": {"type": "boolean"}, "if": {"$ref": "#/$defs/small"}},
        "required": ["not", "if"],
        "additionalProperties": False,
        "uniqueItems": False,
        "$defs": {"small": {"enum": [1, 2]}},
    }
    outs = _run(engine, {"ok": ([5], SamplingParams(max_tokens=60, structured_outputs=StructuredOutputs(json=schema)))})
    assert outs["ok"][-1].finish_reason == "stop" and outs["ok"][-1].error is None


@pytest.mark.parametrize("depth,error", [(400, "uniqueItems"), (5000, "nested too deeply")])
def test_deeply_nested_schemas_are_refused_not_a_recursion_error(engine, depth, error):
    text = '{"items": ' * depth + '{"type": "string", "uniqueItems": true}' + "}" * depth  # within the size bound
    with pytest.raises(ValueError, match=error):  # RequestError from the engine, FieldError from decoding
        engine.add_request("deep", [5], SamplingParams(structured_outputs=StructuredOutputs(json=text)))
    assert not engine.has_work


def test_a_constraint_over_the_size_bound_is_refused_before_compiling(engine):
    regex = "(" + "|".join(f"w{i:05d}" for i in range(MAX_GRAMMAR_BYTES // 7 + 1)) + ")"
    before = engine.grammars.num_compiles
    with pytest.raises(RequestError, match=f"structured_outputs.regex: .* at most {MAX_GRAMMAR_BYTES} bytes"):
        engine.add_request("big", [5], SamplingParams(structured_outputs=StructuredOutputs(regex=regex)))
    assert engine.grammars.num_compiles == before and not engine.has_work


def test_an_ambiguous_grammar_ends_with_an_error_once_its_masks_run_over_budget(engine):
    """Issue 28, critical 2: with its only token forced, the ambiguous grammar's mask work grows with every
    token (on the demo vocab ~1 ms at 60 tokens, ~0.1 s at 160, ~4 s at 360); the request ends with an error
    once one mask passes the budget, and a request beside it runs to its end untouched."""
    engine.grammars.mask_budget = 0.02
    try:
        forced = {67: 100.0}  # "a", the grammar's only character
        attack = SamplingParams(
            max_tokens=900, ignore_eos=True, logit_bias=forced, structured_outputs=StructuredOutputs(grammar=AMBIGUOUS)
        )
        normal = SamplingParams(max_tokens=300, ignore_eos=True, temperature=0.0)
        outs = _run(engine, {"attack": ([5, 6], attack), "normal": ([7, 8], normal)})
    finally:
        engine.grammars.mask_budget = 0.05
    last = outs["attack"][-1]
    assert last.finish_reason == "error" and "budget" in last.error, last
    assert 20 < sum(o.token_id is not None for o in outs["attack"]) < 900
    assert outs["normal"][-1].finish_reason == "length" and len(outs["normal"]) == 300
