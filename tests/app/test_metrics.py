"""/metrics rendering (app/metrics.py) without a server: engine counters are left out, never reported as 0,
when the engine's values did not come."""

import os


def test_engine_counters_are_left_out_rather_than_reset_when_the_engine_does_not_answer():
    """A scrape that got no (or partial) engine values must not report the engine's counters as 0: Prometheus
    would read that as a counter reset."""
    from prometheus_client.parser import text_string_to_metric_families

    from ringllm.app.metrics import Metrics
    from ringllm.ipc.shared_table import SharedTable

    table = SharedTable(f"/ringllm-test-{os.getpid()}-metrics", 1, create=True)
    try:
        metrics = Metrics(table, 0, "m")
        full = {
            f.name
            for f in text_string_to_metric_families(
                metrics.render(
                    {"generated_tokens": 5, "prefix_cache_query_tokens": 9, "hist:request_prompt_tokens:sum": 3}
                ).decode()
            )
        }
        empty = {f.name for f in text_string_to_metric_families(metrics.render({}).decode())}
    finally:
        table.close(unlink=True)
    assert {"ringllm_generation_tokens", "ringllm_prefix_cache_queries", "ringllm_request_prompt_tokens"} <= full
    assert not {"ringllm_generation_tokens", "ringllm_prefix_cache_queries", "ringllm_request_prompt_tokens"} & empty
    assert {"ringllm_prompt_tokens", "ringllm_num_requests_running", "ringllm_e2e_request_latency_seconds"} <= empty
