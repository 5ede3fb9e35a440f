"""Prometheus metrics, rendered by prometheus_client: the engine's gauges, counters and request histograms
(from a stats round trip), the latency histograms and counters of every API worker, and the engine
process's process_* metrics (prometheus_client's ProcessCollector reading /proc/<engine pid>). Every
ringllm_ series carries model_name (the first served name), as vLLM's do. Names follow Prometheus
conventions: counters end in _total, times are in seconds, and the vLLM series each one stands for is listed
in README.md ("Metrics").

Each worker records into its own row of a shared table (ipc.shared_table) and /metrics renders the sums of
all rows, so every scrape sees the whole server whichever worker answers it."""

from __future__ import annotations

import bisect

from prometheus_client import CollectorRegistry, ProcessCollector, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

from ringllm.app.vllm_metrics import vllm_families
from ringllm.engine.request_stats import HISTOGRAMS as ENGINE_HISTOGRAMS
from ringllm.engine.request_stats import LENGTH_BUCKETS, bucket_key, sum_key
from ringllm.ipc.shared_table import COLUMNS, SharedTable

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
FINISH_REASONS = ("stop", "length", "abort", "error")  # every reason the server ends a request with
N_BUCKETS = (1, 2, 5, 10, 20)  # vLLM's for request_params_n
LABELS = ["model_name"]


class Histogram:
    """Bucket counts (the last one past every bound) then the sum, in `width` columns of a row from `start`."""

    def __init__(self, name: str, help_text: str, row: memoryview[float], start: int, buckets=LATENCY_BUCKETS):
        self.name, self.help, self.buckets = name, help_text, buckets
        self.row, self.start = row, start
        self.width = len(buckets) + 2

    def observe(self, value: float) -> None:
        self.row[self.start + bisect.bisect_left(self.buckets, value)] += 1
        self.row[self.start + self.width - 1] += value

    def family(self, totals: list[float], model: str) -> HistogramMetricFamily:
        counts = totals[self.start : self.start + len(self.buckets) + 1]
        return _histogram(self.name, self.help, self.buckets, counts, totals[self.start + self.width - 1], model)


def _histogram(name: str, help_text: str, bounds, counts, total: float, model: str) -> HistogramMetricFamily:
    """A histogram family from per-bucket (not cumulative) counts, the last one past every bound."""
    cumulative, buckets = 0, []
    for bound, count in zip(bounds, counts):
        cumulative += int(count)
        buckets.append((str(float(bound)), cumulative))
    buckets.append(("+Inf", cumulative + int(counts[-1])))
    family = HistogramMetricFamily(name, help_text, labels=LABELS)
    family.add_metric([model], buckets, total)
    return family


class _Snapshot:
    """The collector of one scrape: what the engine answered and the table's totals at that moment."""

    def __init__(self, metrics: Metrics):
        self.metrics = metrics
        self.engine: dict[str, float] = {}

    def collect(self):
        return self.metrics.families(self.engine)


class Metrics:
    """This worker's recorder (row `index` of `table`) and the renderer of every worker's totals."""

    def __init__(self, table: SharedTable, index: int, model_name: str = "ringllm", engine_pid: int | None = None):
        self.table, self.model = table, model_name
        row = table.row(index)
        self.ttft = Histogram(
            "ringllm_time_to_first_token_seconds", "Time from request arrival to its first token.", row, 0
        )
        self.itl = Histogram(
            "ringllm_inter_token_latency_seconds", "Time between successive streamed pieces.", row, self.ttft.width
        )
        self.e2e = Histogram(
            "ringllm_e2e_request_latency_seconds", "Time from request arrival to its end.", row, 2 * self.ttft.width
        )
        self.row = row
        self.requests_at = 3 * self.ttft.width  # one column per finish reason
        self.prompt_tokens_at = self.requests_at + len(FINISH_REASONS)
        self.params_n = Histogram(
            "ringllm_request_params_n",
            "The n (choices) of each prompt taken.",
            row,
            self.prompt_tokens_at + 1,
            N_BUCKETS,
        )
        self.params_max_tokens = Histogram(
            "ringllm_request_params_max_tokens",
            "The max_tokens of each prompt taken (the default filled in where the request had none).",
            row,
            self.params_n.start + self.params_n.width,
            LENGTH_BUCKETS,
        )
        assert self.params_max_tokens.start + self.params_max_tokens.width <= COLUMNS
        self.snapshot = _Snapshot(self)
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self.snapshot)
        if engine_pid is not None:  # process_cpu_seconds_total, process_resident_memory_bytes, ... of the engine
            ProcessCollector(pid=lambda: engine_pid, registry=self.registry)

    def finished(self, reason: str, prompt_tokens: int, seconds: float) -> None:
        self.row[self.requests_at + FINISH_REASONS.index(reason)] += 1
        self.row[self.prompt_tokens_at] += prompt_tokens
        self.e2e.observe(seconds)

    def taken(self, prompts: int, n: int, max_tokens: int) -> None:
        """A request was taken: `prompts` prompts of `n` choices each, up to `max_tokens` tokens each (vLLM's
        request_params_n and request_params_max_tokens count each prompt as a request)."""
        for _ in range(prompts):
            self.params_n.observe(n)
            self.params_max_tokens.observe(max_tokens)

    def finished_counts(self, totals: list[float], engine: dict[str, float]) -> list[int]:
        """Finished requests per FINISH_REASONS, every worker's; the aborted ones include those the engine aborted
        because their API worker died (it could not count them: engine/server.py)."""
        counts = [int(totals[self.requests_at + i]) for i in range(len(FINISH_REASONS))]
        counts[FINISH_REASONS.index("abort")] += int(engine.get("aborted_orphans", 0))
        return counts

    def render(self, engine: dict[str, float]) -> bytes:
        self.snapshot.engine = engine
        return generate_latest(self.registry)

    def families(self, engine: dict[str, float]):
        totals, model = self.table.totals(), self.model
        gauges = [
            ("ringllm_num_requests_running", "Requests being computed.", engine.get("running", 0)),
            ("ringllm_num_requests_waiting", "Requests waiting for admission.", engine.get("waiting", 0)),
            (
                "ringllm_kv_cache_usage_ratio",
                "Share of KV slots in use (requests and prefix cache).",
                engine.get("kv_slots_used", 0) / max(1.0, engine.get("kv_slots_total", 1)),
            ),
            (
                "ringllm_kv_cache_slots_used_by_requests",
                "KV slots held by running requests.",
                engine.get("kv_slots_used_by_requests", 0),
            ),
            (
                "ringllm_prefix_cache_hit_rate",
                "Share of prompt tokens found in the prefix cache since start "
                "(use the _queries/_hits counters for a windowed rate).",
                engine.get("prefix_cache_hit_rate", 0),
            ),
        ]
        for name, help_text, value in gauges:
            family = GaugeMetricFamily(name, help_text, labels=LABELS)
            family.add_metric([model], value)
            yield family
        # The engine's counters and histograms are left out of a scrape whose answer lacks them (the engine is
        # gone, or the heartbeat's fallback values hold only some): a counter reported as 0 would read as a reset.
        counters: list[tuple[str, str, float | None]] = [
            ("ringllm_generation_tokens_total", "Tokens generated by the engine.", engine.get("generated_tokens")),
            (
                "ringllm_prompt_tokens_computed_total",
                "Prompt tokens the engine computed (cache misses).",
                engine.get("prompt_tokens_computed"),
            ),
            ("ringllm_preemptions_total", "Requests preempted for KV space.", engine.get("preemptions")),
            (
                "ringllm_prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
                engine.get("prefix_cache_query_tokens"),
            ),
            (
                "ringllm_prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
                engine.get("prefix_cache_hit_tokens"),
            ),
            (
                "ringllm_prompt_tokens_total",
                "Prompt tokens of the finished requests (cached or not).",
                int(totals[self.prompt_tokens_at]),
            ),
        ]
        for name, help_text, total in counters:
            if total is None:
                continue
            counter = CounterMetricFamily(name, help_text, labels=LABELS)
            counter.add_metric([model], total)
            yield counter
        requests = CounterMetricFamily(
            "ringllm_requests_total", "Finished requests, by finish reason.", labels=[*LABELS, "finish_reason"]
        )
        for r, count in zip(FINISH_REASONS, self.finished_counts(totals, engine)):
            requests.add_metric([model, r], count)
        yield requests
        for h in (self.ttft, self.itl, self.e2e, self.params_n, self.params_max_tokens):
            yield h.family(totals, model)
        yield from vllm_families(self, engine, totals, FINISH_REASONS)  # the same values under vLLM's names
        yield from self.engine_histograms(engine, "ringllm_")

    def engine_histograms(self, engine: dict[str, float], prefix: str, names: dict[str, str] | None = None):
        """The engine's request histograms, each named `prefix` + its name or `names`' name for it (left out of
        a scrape whose answer lacks them)."""
        for name, (help_text, bounds) in ENGINE_HISTOGRAMS.items():
            if sum_key(name) not in engine:
                continue
            counts = [engine.get(bucket_key(name, i), 0.0) for i in range(len(bounds) + 1)]
            total = engine.get(sum_key(name), 0.0)
            yield _histogram(prefix + (names or {}).get(name, name), help_text, bounds, counts, total, self.model)
