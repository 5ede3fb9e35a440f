"""/metrics serves vLLM's names for the values ringllm measures, beside its own (app/vllm_metrics.py)."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from ringllm.app.metrics import Metrics
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
