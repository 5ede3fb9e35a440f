"""Sampling fields of the request contract (ipc/sampling.py) on a real engine through the offline API (the demo
model): logit_bias, min_tokens, allowed_token_ids, bad_words, prompt_logprobs, truncate_prompt_tokens,
priority, token ids checked against the vocabulary. The same fields over HTTP: tests/e2e/test_sampling_fields.py;
the body → wire → sampler path: tests/ipc/test_sampling.py."""

import pytest

from ringllm.ipc.sampling import SamplingParams, StructuredOutputs
from ringllm.text.bad_words import bad_words_token_ids


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


def test_every_token_id_field_is_checked_against_the_vocabulary_offline(llm):
    """One check (SamplingParams.token_id_outside) serves the API worker and the engine (its API half:
    tests/e2e/test_sampling_fields.py)."""
    from ringllm.engine.engine import RequestError

    with pytest.raises(RequestError, match="stop_token_ids: token id 5000"):
        llm.generate_batch(["x"], SamplingParams(stop_token_ids=[5000]))
