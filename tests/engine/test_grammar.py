"""engine/grammar.py and engine/grammar_schema.py on the CPU engine (the demo model): the hardening of issue 28's
structured-output attacks. Each test reproduces an attack and checks the bound that stops it."""

import time

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
            outs.setdefault(o.rid, []).append(o)  # requests added before, too
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


def _slow_schema(k: int, repeat: int = 2500) -> StructuredOutputs:
    """A small schema whose pattern takes seconds to compile (its conversion grows with repeat squared)."""
    pattern = f"^(a|b|c){{{repeat}}}{k}$"
    return StructuredOutputs(json={"type": "object", "properties": {"p": {"type": "string", "pattern": pattern}}})


def test_the_compile_queue_is_bounded_and_abandoned_compiles_never_run(demo_path):
    """Issue 28, critical 1: held requests with slow distinct grammars queue at most MAX_QUEUED_COMPILES
    compiles (one more is a 503-class refusal), and those of requests that left never run."""
    from ringllm.engine.grammar import COMPILE_THREADS, MAX_QUEUED_COMPILES

    engine = Engine(EngineConfig(model=str(demo_path), device="cpu", kv_cache_tokens=4096, context_len=512))
    try:
        engine.grammars.compile(StructuredOutputs(regex="warm")).result()  # the compiler is built
        held = COMPILE_THREADS + MAX_QUEUED_COMPILES
        for k in range(held):
            engine.add_request(f"h{k}", [5], SamplingParams(structured_outputs=_slow_schema(k)))
            while k < COMPILE_THREADS and engine.grammars.num_compiles_run < k + 2:
                time.sleep(0.01)  # the first ones run: the queue holds the rest
        with pytest.raises(RequestError, match="grammar compile queue is full"):
            engine.add_request("one-more", [5], SamplingParams(structured_outputs=_slow_schema(held)))
        engine.add_request("plain", [5], SamplingParams(max_tokens=3))  # unconstrained requests still get in
        for k in range(held):
            assert engine.abort(f"h{k}") is not None
        outs = _run(engine, {})
        assert list(outs) == ["plain"] and outs["plain"][-1].finish_reason == "length"
        assert engine.grammars.num_compiles_run <= 1 + COMPILE_THREADS + 1  # the warm-up, those running, a race
    finally:
        engine.close()


def test_requests_waiting_for_grammars_take_a_quarter_of_the_waiting_queue(demo_path):
    """A fan-out (prompts x n) on one slow grammar compiles it once but cannot fill the waiting queue."""
    engine = Engine(
        EngineConfig(model=str(demo_path), device="cpu", kv_cache_tokens=4096, context_len=512, max_waiting_requests=8)
    )
    try:
        so = _slow_schema(0, repeat=1500)
        for k in range(2):
            engine.add_request(f"fan{k}", [5], SamplingParams(structured_outputs=so, max_tokens=5))
        with pytest.raises(RequestError, match="grammar compile queue is full"):
            engine.add_request("fan2", [5], SamplingParams(structured_outputs=so, max_tokens=5))
        outs = _run(engine, {"plain": ([5], SamplingParams(max_tokens=3))})
        assert outs["plain"][-1].finish_reason == "length"
        assert outs["fan0"][-1].finish_reason and outs["fan1"][-1].finish_reason
        assert engine.grammars.num_compiles == 1
    finally:
        engine.close()


def test_a_running_compile_does_not_hold_the_process_at_exit(demo_path, tmp_path):
    """Issue 28, minor: a drained engine closes its grammars and exits; a compile still running (minutes, for a
    crafted schema) must not keep the process alive."""
    import subprocess
    import sys

    script = f"""
import time
from ringllm.engine.grammar import Grammars
from ringllm.text.tokenizer import transformers_tokenizer
from tests.engine.test_grammar import _slow_schema
g = Grammars(lambda: transformers_tokenizer({str(demo_path)!r}), 1024, [2])
g.compile(_slow_schema(0, repeat=6000))
time.sleep(0.5)
g.close()
print("closed", flush=True)
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "closed"
        closed = time.monotonic()
        assert proc.wait(timeout=30) == 0
        assert time.monotonic() - closed < 3.0  # the compile itself takes ~20 s or more
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    "so", [StructuredOutputs(grammar="root ::= [^\\x00-\\U0010FFFF]"), StructuredOutputs(regex="[^\\x00-\\U0010FFFF]")]
)
def test_an_unsatisfiable_constraint_is_refused_like_one_that_does_not_compile(engine, so):
    """Issue 28, minor: a constraint that allows no first token was a 200 with finish_reason "error"; it now
    fails as its compile does (the server answers 400 with the error), before anything runs."""
    outs = _run(engine, {"none": ([5], SamplingParams(max_tokens=5, structured_outputs=so))})
    [out] = outs["none"]
    assert out.token_id is None and out.finish_reason == "error"
    assert out.error is not None and out.error.startswith(f"structured_outputs.{so.kind}: the constraint allows no")


def test_a_compile_past_its_time_is_stopped_with_a_clear_error(demo_path):
    """Issue 28, critical 1: the compile of a small schema whose pattern converts for minutes runs in a child
    process, killed at the time limit (EngineConfig.grammar_compile_timeout, --grammar-compile-timeout); the
    request fails naming its field, and compiles go on."""
    config = EngineConfig(
        model=str(demo_path), device="cpu", kv_cache_tokens=4096, context_len=1024, grammar_compile_timeout=1.0
    )
    engine = Engine(config)
    try:
        start = time.monotonic()
        outs = _run(engine, {"slow": ([5], SamplingParams(structured_outputs=_slow_schema(0, repeat=14000)))})
        took = time.monotonic() - start
        [out] = outs["slow"]
        assert (
            out.finish_reason == "error"
            and out.error == "structured_outputs.json: did not compile within 1 s; simplify it"
        )
        assert took < 30  # the compile itself: ~60 s; the rest is a fresh process starting (torch's import)
        regex = StructuredOutputs(regex="ok")
        ok = _run(engine, {"after": ([5], SamplingParams(max_tokens=9, structured_outputs=regex))})
        assert ok["after"][-1].finish_reason == "stop"
    finally:
        engine.close()


def test_a_running_compile_whose_request_left_is_stopped(engine):
    """Issue 28, critical 1: a client that leaves while its grammar compiles stops the compile (its process is
    killed), instead of leaving it to hold a compile thread for as long as it runs."""
    so = _slow_schema(1, repeat=14000)
    engine.add_request("left", [5], SamplingParams(structured_outputs=so))
    future = engine.grammars.compile(so)
    before = engine.grammars.num_compiles_run
    while engine.grammars.num_compiles_run == before and not future.done():
        time.sleep(0.01)  # (num_compiles_run counted it already, or it starts now)
    time.sleep(0.5)
    assert not future.done()
    engine.abort("left")
    stopped = time.monotonic()
    with pytest.raises(Exception, match="every request waiting for this grammar left"):
        future.result(timeout=5)
    assert time.monotonic() - stopped < 2
    assert not engine.has_work
