"""The offline API on the demo model: streaming, batches, stop strings, seeds, errors, an early exit from a
stream."""

import asyncio

import pytest

from ringllm.engine import LLM, SamplingParams
from ringllm.engine.engine import RequestError
from ringllm.engine.loader import ModelNotFoundError


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from ringllm.engine.demo import demo_model_path

    path = demo_model_path(tmp_path_factory.mktemp("cache"))
    with LLM(model=str(path), device="cpu", kv_cache_tokens=8192, context_len=256) as llm:
        yield llm


def test_stream_equals_batch(llm):
    params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
    [batch] = llm.generate_batch(["The sea is"], params)

    async def collect():
        return [p async for p in llm.generate("The sea is", params)]

    pieces = asyncio.run(collect())
    assert pieces[-1].finish_reason == "length" and all(p.finish_reason is None for p in pieces[:-1])
    assert [t for p in pieces for t in p.token_ids] == batch.token_ids
    assert "".join(p.text for p in pieces) == batch.text == llm.tokenizer.decode(batch.token_ids)
    assert len(batch.token_ids) == 24 and batch.prompt_tokens == len(llm.tokenizer.encode("The sea is"))


def test_batch_of_prompts_and_token_ids(llm):
    params = SamplingParams(max_tokens=8, temperature=0.0, ignore_eos=True)
    prompts = ["Hello", "What is the capital of France?", llm.tokenizer.encode("def add(a, b):")]
    out = llm.generate_batch(prompts, params)
    assert [len(o.token_ids) for o in out] == [8, 8, 8]
    single = llm.generate_batch([prompts[1]], params)[0]
    assert single.token_ids == out[1].token_ids  # batching does not change greedy tokens


def test_stop_string_is_not_emitted(llm):
    params = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    [full] = llm.generate_batch(["Once"], params)
    stop = full.text[10:14]  # a piece of text the model will produce
    assert stop
    [cut] = llm.generate_batch(["Once"], SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True, stop=[stop]))
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.find(stop)]


def test_seed_reproducible(llm):
    p = SamplingParams(max_tokens=16, temperature=1.0, seed=42)
    a = llm.generate_batch(["Hi", "Hi", "other text"], p)
    b = llm.generate_batch(["Hi"], p)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids


def test_stop_token_ids(llm):
    params = SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True)
    [full] = llm.generate_batch(["The river"], params)
    target = full.token_ids[5]
    [cut] = llm.generate_batch(
        ["The river"], SamplingParams(max_tokens=30, temperature=0.0, ignore_eos=True, stop_token_ids=[target])
    )
    assert cut.token_ids == full.token_ids[: full.token_ids.index(target) + 1]
    assert cut.finish_reason == "stop"


def test_bad_arguments(llm):
    with pytest.raises(ValueError, match="max_tokens"):
        SamplingParams(max_tokens=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    with pytest.raises(RequestError, match="prompt has 300 tokens"):
        llm.generate_batch([[5] * 300])
    with pytest.raises(RequestError, match="out of vocabulary"):
        llm.generate_batch([[10**6]])
    with pytest.raises(RequestError, match="empty"):
        llm.generate_batch([[]])
    with pytest.raises(ModelNotFoundError):
        LLM(model="/no/such/checkpoint", device="cpu")
    assert llm.generate_batch(["still serving"], SamplingParams(max_tokens=2))[0].finish_reason is not None


def test_early_exit_from_stream_aborts(llm):
    async def first_piece():
        async for piece in llm.generate("abort me", SamplingParams(max_tokens=200, ignore_eos=True)):
            return piece

    asyncio.run(first_piece())
    for _ in range(100):
        if llm.engine.stats()["kv_slots_used_by_requests"] == 0:
            break
        import time

        time.sleep(0.05)
    assert llm.engine.stats()["kv_slots_used_by_requests"] == 0
