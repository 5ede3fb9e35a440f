"""/metrics serves vLLM's names for the values ringllm measures, beside its own (app/vllm_metrics.py)."""

from __future__ import annotations

import time
from types import SimpleNamespace

from prometheus_client.parser import text_string_to_metric_families

from ringllm.app.metrics import Metrics
from ringllm.engine.request_stats import RequestStats
from tests.app.fake_engine import MemoryTable

ENGINE = {
    "running": 2,
    "waiting": 1,
    "kv_slots_used": 8,  # the prefix cache's too
    "kv_slots_used_by_requests": 5,
    "kv_slots_total": 10,
    "generated_tokens": 7,
    "preemptions": 1,
    "prefix_cache_query_tokens": 12,
    "prefix_cache_hit_tokens": 4,
}


def _samples(metrics: Metrics, engine: dict) -> dict:
    text = metrics.render(engine).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_vllms_series_carry_the_same_values_as_ringllms():
    metrics = Metrics(MemoryTable(), 0, "m")
    metrics.finished("stop", 5, 0.2)
    metrics.finished("length", 3, 0.4)
    metrics.ttft.observe(0.1)
    got = _samples(metrics, ENGINE)
    model = (("model_name", "m"),)
    assert got[("vllm:num_requests_running", model)] == 2 and got[("vllm:num_requests_waiting", model)] == 1
    assert got[("vllm:kv_cache_usage_perc", model)] == 0.5  # requests' KV only, as vLLM counts it
    assert got[("vllm:generation_tokens_total", model)] == got[("ringllm_generation_tokens_total", model)] == 7
    assert got[("vllm:prompt_tokens_total", model)] == got[("ringllm_prompt_tokens_total", model)] == 8
    assert got[("vllm:num_preemptions_total", model)] == 1
    assert (got[("vllm:prefix_cache_queries_total", model)], got[("vllm:prefix_cache_hits_total", model)]) == (12, 4)
    for reason, count in (("stop", 1), ("length", 1), ("abort", 0)):
        assert got[("vllm:request_success_total", (("finished_reason", reason), ("model_name", "m")))] == count
    for name in ("time_to_first_token_seconds", "e2e_request_latency_seconds", "inter_token_latency_seconds"):
        assert got[(f"vllm:{name}_count", model)] == got[(f"ringllm_{name}_count", model)]
    assert got[("vllm:e2e_request_latency_seconds_count", model)] == 2


def test_engine_counters_missing_from_a_scrape_are_left_out_under_vllms_names_too():
    got = _samples(Metrics(MemoryTable(), 0, "m"), {"running": 0})
    names = {name for name, _ in got}
    assert "vllm:num_requests_running" in names and "vllm:generation_tokens_total" not in names


def test_the_engines_request_histograms_and_the_request_parameters_have_vllms_names():
    """vLLM's per-request histograms: the engine's (queue, prefill, decode, inference time, lengths, iteration
    tokens) under vLLM's names, the API worker's n and max_tokens of each prompt taken, and the KV cache's size
    as cache_config_info."""
    stats = RequestStats()
    seq = SimpleNamespace(arrival=time.monotonic(), scheduled_at=time.monotonic(), num_prompt=9)
    stats.arrived("a", seq)
    for _ in range(3):  # three iterations of one token each: the first carries the prompt
        stats.token("a")
        stats.end_iteration()
    stats.end_iteration()  # an iteration that output nothing is not one
    stats.finished("a")
    metrics = Metrics(MemoryTable(), 0, "m")
    metrics.taken(2, 3, 40)  # two prompts, n=3, max_tokens 40
    got = _samples(metrics, {**ENGINE, **stats.values()})
    model = (("model_name", "m"),)
    assert (got[("vllm:iteration_tokens_total_count", model)], got[("vllm:iteration_tokens_total_sum", model)]) == (
        3,
        9 + 3,
    )
    for name in ("queue_time", "prefill_time", "decode_time", "inference_time"):
        assert got[(f"vllm:request_{name}_seconds_count", model)] == 1
        assert got[(f"ringllm_request_{name}_seconds_count", model)] == 1
    assert got[("vllm:request_prompt_tokens_sum", model)] == 9
    assert got[("vllm:request_generation_tokens_sum", model)] == 3
    assert (got[("vllm:request_params_n_count", model)], got[("vllm:request_params_n_sum", model)]) == (2, 6)
    assert got[("vllm:request_params_max_tokens_sum", model)] == got[("ringllm_request_params_max_tokens_sum", model)]
    assert got[("vllm:request_params_max_tokens_sum", model)] == 80
    assert got[("vllm:cache_config_info", (("kv_cache_tokens", "10"), ("model_name", "m")))] == 1
