"""scripts/bench_client.py, the HTTP load generator: its workloads (nano exactly nano-vllm's, whatever the server
reports), vLLM's `vllm bench serve` flag names, strict-JSON results, and runs against `ringllm serve` on the demo
model (streaming, chat mode, goodput, a failing run, Ctrl-C with partial results)."""

import importlib.util
import json
import math
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import start_server, stop_server

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cache = tmp_path_factory.mktemp("bench-client")
    proc, base = start_server(cache, "--kv-cache-tokens", "8192", "--context-len", "256")
    yield base, cache
    stop_server(proc)


def _bench_client():
    spec = importlib.util.spec_from_file_location("bench_client", ROOT / "scripts/bench_client.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_client"] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def _bench(base: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "scripts/bench_client.py"), "--base-url", base + "/v1", "--no-progress", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_bench_client_nano_against_the_demo_model_with_vllm_keys(served, tmp_path):
    """nano is sized to the demo model (vocabulary 1024 from /v1/models, lengths to the context); every
    request must succeed and the token counts must be the server's (ignore_eos: exactly max_tokens)."""
    base, _ = served
    out = tmp_path / "nano.json"
    args = [
        "--workload",
        "nano",
        "--num-requests",
        "3",
        "--seed",
        "7",
        "--max-model-len",
        "48",
        "--max-concurrency",
        "2",
        "--request-rate",
        "20",
        "--json",
        str(out),
    ]
    run = _bench(base, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    s = json.loads(out.read_text())
    bench = _bench_client()
    a = bench.parser().parse_args(["--base-url", base + "/v1", *args])
    work = bench.build_workload(a, bench.Target("ringllm-demo", 1024, 256))
    assert all(t < 1024 for r in work for t in r["prompt"]) and len(work) == 3
    assert (s["completed"], s["failed"]) == (3, 0)
    assert s["total_output_tokens"] == sum(r["max_tokens"] for r in work)
    assert s["total_input_tokens"] == sum(len(r["prompt"]) for r in work)
    for key in ("request_throughput", "output_throughput", "total_token_throughput", "duration"):
        assert s[key] > 0, key
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "std", "p99"):
            assert f"{stat}_{metric}_ms" in s, (stat, metric)
    assert s["p99_e2el_ms"] >= s["median_e2el_ms"] > 0


def test_bench_client_chat_mode_goodput_and_a_failing_run(served):
    base, _ = served
    run = _bench(
        base,
        "--backend",
        "openai-chat",
        "--workload",
        "random",
        "--input-len",
        "4:8",
        "--output-len",
        "2:4",
        "--num-requests",
        "2",
        "--goodput",
        "e2el:600000",
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "goodput:" in run.stdout
    bad = _bench(base, "--workload", "random", "--num-requests", "2", "--model", "no-such-model")
    assert bad.returncode == 1 and "HTTP 404" in bad.stdout


def test_jsonl_conversations_reach_the_chat_endpoint_whole(served, tmp_path):
    """A jsonl row may carry a whole conversation ("messages": system prompt, earlier turns) for the chat
    backend; it is sent as it is, beside a row that carries a plain "prompt", and --ignore-eos makes every
    request generate exactly its max_tokens. The completion backend refuses conversations by name."""
    base, _ = served
    conversation = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": "and now?"},
    ]
    rows = [{"messages": conversation, "max_tokens": 3}, {"prompt": "hello", "max_tokens": 2}]
    file = tmp_path / "chat.jsonl"
    file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bench = _bench_client()
    a = bench.parser().parse_args(["--workload", "jsonl", "--file", str(file), "--backend", "openai-chat"])
    work = bench.build_workload(a, bench.Target("m", None, None))
    assert work[0]["messages"] == conversation and "prompt" not in work[0] and work[1]["prompt"] == "hello"
    out = tmp_path / "chat.json"
    args = ("--backend", "openai-chat", "--workload", "jsonl", "--file", str(file), "--ignore-eos", "--json", str(out))
    run = _bench(base, *args)
    assert run.returncode == 0, run.stdout + run.stderr
    s = json.loads(out.read_text())
    assert (s["completed"], s["total_output_tokens"]) == (2, 5)
    inputs = []
    for name, messages in (("whole", conversation), ("last", conversation[-1:])):
        one = tmp_path / f"{name}.jsonl"
        one.write_text(json.dumps({"messages": messages, "max_tokens": 1}) + "\n")
        ran = _bench(base, "--backend", "openai-chat", "--workload", "jsonl", "--file", str(one), "--json", str(out))
        assert ran.returncode == 0, ran.stdout + ran.stderr
        inputs.append(json.loads(out.read_text())["total_input_tokens"])
    assert inputs[0] > inputs[1] > 0  # the earlier turns and the system prompt were sent too
    completion = bench.parser().parse_args(["--workload", "jsonl", "--file", str(file)])
    with pytest.raises(SystemExit, match="needs --backend openai-chat"):
        bench.build_workload(completion, bench.Target("m", None, None))


def test_bench_client_percentiles_are_interpolated():
    bench = _bench_client()
    results = [bench.Result(ok=True, prompt_tokens=1, output_tokens=2, ttft=t, latency=2 * t) for t in range(1, 9)]
    s = bench.summarize(results, 1.0, [50.0, 99.0], {})
    assert s["p99_ttft_ms"] == pytest.approx(7930.0)  # not the maximum (8000), as nearest-rank gave
    assert s["median_ttft_ms"] == pytest.approx(4500.0) and s["mean_e2el_ms"] == pytest.approx(9000.0)


def test_bench_client_nano_is_the_engine_benchmarks_nano():
    """With the defaults and a model of at least 10,001 ids and 2,048 positions, the client's nano sends
    exactly nano-vllm's requests, as scripts/bench.py and the vLLM side do: 142,827 prompt and 133,966 output
    tokens (a comparison over HTTP is then between the same requests)."""
    bench = _bench_client()
    work = bench.build_workload(bench.parser().parse_args(["--workload", "nano"]), bench.Target("m", 151936, 4096))
    assert len(work) == 256 and {r["temperature"] for r in work} == {0.6}
    assert sum(r["max_tokens"] for r in work) == 133_966
    assert sum(len(r["prompt"]) for r in work) == 142_827


def test_nano_is_the_same_whether_or_not_the_server_reports_its_vocabulary():
    """vLLM's /v1/models has no vocab_size: nano must still draw nano-vllm's ids in [0, 10000], not [0, 9999]
    (that drew 150,245 output tokens against vLLM instead of 133,966, so the two sides ran different work)."""
    bench = _bench_client()
    args = bench.parser().parse_args(["--workload", "nano"])
    unknown = bench.build_workload(args, bench.Target(None, None, None))
    assert unknown == bench.build_workload(args, bench.Target("m", 151936, 4096))
    assert sum(r["max_tokens"] for r in unknown) == 133_966
    assert max(t for r in unknown for t in r["prompt"]) == 10_000
    small = bench.build_workload(args, bench.Target("m", 1024, 4096))  # a vocabulary it must fit
    assert max(t for r in small for t in r["prompt"]) == 1023


def test_vllm_bench_serve_flags_are_accepted_with_their_meaning(tmp_path):
    bench = _bench_client()
    a = bench.parser().parse_args(
        [
            *("--base-url", "http://h:1", "--endpoint", "/v1/completions", "--dataset-name", "random"),
            *("--random-input-len", "100", "--random-output-len", "10", "--random-range-ratio", "0.5"),
            *("--num-prompts", "5", "--save-result", "--result-dir", str(tmp_path), "--disable-tqdm"),
            *("--percentile-metrics", "ttft,e2el", "--metric-percentiles", "50,95"),
        ]
    )
    root, api = bench.api_urls(a)
    assert (root, api, bench.endpoint_url(a, root, api)) == ("http://h:1", "http://h:1/v1", "http://h:1/v1/completions")
    assert a.no_progress and a.num_requests == 5 and a.percentiles == [50.0, 95.0]
    work = bench.build_workload(a, bench.Target("m", 1000, 4096))
    assert len(work) == 5 and all(50 <= len(r["prompt"]) <= 150 and 5 <= r["max_tokens"] <= 15 for r in work)
    assert bench.parser().parse_args(["--dataset-name", "prefix_repetition"]).workload == "shared-prefix"
    with pytest.raises(SystemExit):
        bench.parser().parse_args(["--dataset-name", "sharegpt"])  # no such workload here: refused, by name
    s = bench.summarize([bench.Result(True, "", 1, 2, 0.1, 0.2)], 1.0, a.percentiles, {}, a.percentile_metrics)
    assert "p95_ttft_ms" in s and "p95_e2el_ms" in s and "p95_itl_ms" not in s
    a2 = bench.parser().parse_args(["--host", "example", "--port", "9", "--endpoint", "/completions"])
    assert bench.endpoint_url(a2, *bench.api_urls(a2)) == "http://example:9/v1/completions"
    s["request_rate"] = "inf"
    assert bench.result_path(a, s).parent == tmp_path


def test_results_are_strict_json_with_inf_as_vllm_writes_it():
    bench = _bench_client()
    s = bench.summarize([], 1.0, [50.0], {})  # no requests: every statistic is NaN
    s["request_rate"] = math.inf
    text = json.dumps(bench.strict_json(s), allow_nan=False)
    loaded = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert loaded["request_rate"] == "inf" and loaded["median_ttft_ms"] is None


def test_base_url_without_v1_and_the_vllm_result_file(served, tmp_path):
    base, _ = served
    run = subprocess.run(
        [
            *(sys.executable, str(ROOT / "scripts/bench_client.py"), "--base-url", base, "--disable-tqdm"),
            *("--dataset-name", "random", "--random-input-len", "6", "--random-output-len", "3"),
            *("--num-prompts", "2", "--save-result", "--result-dir", str(tmp_path)),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    [out] = tmp_path.glob("*.json")
    s = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert (s["completed"], s["failed"], s["request_rate"]) == (2, 0, "inf")
    assert s["total_output_tokens"] == 6


def test_ctrl_c_prints_and_writes_the_finished_requests(served, tmp_path):
    """Interrupted, it stops sending, cancels what is in flight, and still reports: exit 130, strict JSON with
    `interrupted`, and every request accounted for (finished, cancelled or not sent)."""
    base, _ = served
    out = tmp_path / "partial.json"
    proc = subprocess.Popen(
        [
            *(sys.executable, str(ROOT / "scripts/bench_client.py"), "--base-url", base, "--no-progress"),
            *("--workload", "random", "--input-len", "4:8", "--output-len", "200:200", "--num-requests", "40"),
            *("--max-concurrency", "1", "--json", str(out)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        time.sleep(3)  # discovery done, a request in flight: ~40 x 200 tokens take far longer than this
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stdout
    assert "interrupted:" in stdout
    s = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert s["interrupted"] is True
    assert s["completed"] + s["failed"] + s["cancelled"] + s["not_sent"] == 40
    assert s["cancelled"] > 0  # all 40 were started at once (rate inf), most waiting for the concurrency gate
