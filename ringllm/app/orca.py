"""ORCA load reports, as vLLM sends them: a request to a model route with the header
`endpoint-load-metrics-format: TEXT` (or `JSON`) gets, on its whole (non-streamed) answer, an
`endpoint-load-metrics` response header with the engine's load, for a load balancer that weighs its backends by
ORCA reports (Envoy, the Gateway API inference extension).

    endpoint-load-metrics: TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=0.0, ...
    endpoint-load-metrics: JSON {"named_metrics": {"kv_cache_usage_perc": 0.25, "num_requests_waiting": 0.0, ...}}

The values are what the engines last published in their heartbeats (ipc/heartbeat.py; every 50 ms while their
loops turn), summed over the replicas: reading them costs the answer no round trip to an engine. As in vLLM, a
format other than TEXT or JSON (ORCA's BINARY, say) gets no header: the report is a hint to a proxy, and the
answer the client asked for stands without it."""

from __future__ import annotations

import json

REQUEST_HEADER = "endpoint-load-metrics-format"
RESPONSE_HEADER = "endpoint-load-metrics"


def named_metrics(stats: dict[str, float]) -> dict[str, float]:
    """vLLM's two named metrics (its `vllm:kv_cache_usage_perc`, a fraction despite the name: the KV slots
    requests hold, not those the prefix cache keeps; and `vllm:num_requests_waiting`), and the requests
    running, which ringllm has as well."""
    total = max(1.0, stats.get("kv_slots_total", 1.0))
    return {
        "kv_cache_usage_perc": float(stats.get("kv_slots_used_by_requests", 0.0)) / total,
        "num_requests_waiting": float(stats.get("waiting", 0.0)),
        "num_requests_running": float(stats.get("running", 0.0)),
    }


def load_report(metrics_format: str | None, stats: dict[str, float]) -> dict[str, str]:
    """The response header for a request's `endpoint-load-metrics-format` (any case), or none."""
    kind = (metrics_format or "").strip().upper()
    if kind == "TEXT":
        text = ", ".join(f"named_metrics.{name}={value}" for name, value in named_metrics(stats).items())
        return {RESPONSE_HEADER: f"TEXT {text}"}
    if kind == "JSON":
        return {RESPONSE_HEADER: "JSON " + json.dumps({"named_metrics": named_metrics(stats)})}
    return {}
