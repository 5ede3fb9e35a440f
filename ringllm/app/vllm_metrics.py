"""vLLM's names for the series ringllm serves (`vllm:num_requests_running`, ...), beside ringllm's own, so that a
dashboard or autoscaler written for vLLM reads a ringllm server. Only series with the same meaning are served
under vLLM's name; vLLM's series that ringllm does not measure (its deprecated and hidden ones, speculative
decoding, LoRA, multimodal caches) are not invented."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

if TYPE_CHECKING:
    from ringllm.app.metrics import Metrics

LABELS = ["model_name"]
# the engine's histograms (engine/request_stats.py) whose vLLM name is not "vllm:" + ringllm's
ENGINE_NAMES = {"iteration_tokens": "iteration_tokens_total"}


def vllm_families(metrics: Metrics, engine: dict[str, float], totals: list[float], reasons) -> Iterator:
    """`reasons`: ringllm's finish reasons, in the order of the table's request counts (vLLM's finished_reason
    label takes the same words)."""
    model = metrics.model
    kv_total = max(1.0, engine.get("kv_slots_total", 1))
    gauges = [
        ("vllm:num_requests_running", "Requests in model execution batches.", engine.get("running", 0)),
        ("vllm:num_requests_waiting", "Requests waiting to be processed.", engine.get("waiting", 0)),
        # vLLM's: the share of KV blocks requests hold (blocks the prefix cache keeps but no request holds are
        # free), so it is 0 again once every request ended.
        (
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage.",
            engine.get("kv_slots_used_by_requests", 0) / kv_total,
        ),
    ]
    for name, help_text, value in gauges:
        family = GaugeMetricFamily(name, help_text, labels=LABELS)
        family.add_metric([model], value)
        yield family
    counters = [
        ("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", engine.get("prefix_cache_query_tokens")),
        ("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", engine.get("prefix_cache_hit_tokens")),
        ("vllm:num_preemptions", "Cumulative number of preemptions.", engine.get("preemptions")),
        ("vllm:generation_tokens", "Number of generation tokens processed.", engine.get("generated_tokens")),
        ("vllm:prompt_tokens", "Number of prefill tokens processed.", float(totals[metrics.prompt_tokens_at])),
    ]
    for name, help_text, total in counters:
        if total is None:  # the engine's answer lacks it: a 0 would read as a reset
            continue
        counter = CounterMetricFamily(name, help_text, labels=LABELS)
        counter.add_metric([model], total)
        yield counter
    success = CounterMetricFamily(
        "vllm:request_success", "Count of successfully processed requests.", labels=[*LABELS, "finished_reason"]
    )
    for reason, count in zip(reasons, metrics.finished_counts(totals, engine)):
        success.add_metric([model, reason], count)
    yield success
    for histogram, name in (
        (metrics.ttft, "vllm:time_to_first_token_seconds"),
        (metrics.itl, "vllm:inter_token_latency_seconds"),
        (metrics.e2e, "vllm:e2e_request_latency_seconds"),
        (metrics.params_n, "vllm:request_params_n"),
        (metrics.params_max_tokens, "vllm:request_params_max_tokens"),
    ):
        yield _renamed(histogram.family(totals, model), name)
    yield from metrics.engine_histograms(engine, "vllm:", ENGINE_NAMES)
    if "kv_slots_total" in engine:
        # vLLM's labels describe its blocks; ringllm's KV cache is counted in token slots, so that is the label
        info = GaugeMetricFamily(
            "vllm:cache_config_info", "Information of the KV cache configuration.", labels=[*LABELS, "kv_cache_tokens"]
        )
        info.add_metric([model, str(int(engine["kv_slots_total"]))], 1.0)
        yield info


def _renamed(family: HistogramMetricFamily, name: str) -> HistogramMetricFamily:
    renamed = HistogramMetricFamily(name, family.documentation, labels=LABELS)
    renamed.samples = [s._replace(name=name + s.name[len(family.name) :]) for s in family.samples]
    return renamed
