"""Tools people already use, against `ringllm serve` on the demo model: curl, lm-evaluation-harness (its
local-completions and local-chat-completions clients on a tiny generated task), a Prometheus parser on
/metrics, and the ready banner."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import start_server, stop_server

BIN = Path(sys.executable).parent
QUESTIONS = [
    "The capital of the sea is",
    "Two and two make",
    "Once upon a time",
    "The river runs",
    "A small fast server",
    "Tokens go in and",
]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    cache = tmp_path_factory.mktemp("clients")
    proc, base = start_server(cache, "--kv-cache-tokens", "8192", "--context-len", "256", "--workers", "2")
    yield base, cache
    stop_server(proc)


def test_ready_banner_names_url_model_layout_and_capacity(served):
    base, cache = served
    log = (cache / "serve.log").read_text()
    assert f"ringllm ready on {base} | model ringllm-demo | tp 1 pp 1 | KV capacity 8192 tokens" in log


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_completion_and_stream(served):
    base, _ = served
    out = subprocess.run(
        [
            "curl",
            "-sS",
            base + "/v1/completions",
            "-H",
            "content-type: application/json",
            "-d",
            '{"prompt": "Hello", "max_tokens": 5, "temperature": 0}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert json.loads(out)["usage"]["completion_tokens"] == 5
    stream = subprocess.run(
        [
            "curl",
            "-sSN",
            base + "/v1/chat/completions",
            "-H",
            "content-type: application/json",
            "-d",
            '{"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": true}',
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    events = [e for e in stream.split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"


def _scrape(base: str) -> dict:
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}


def _sample(families: dict, family: str, sample: str, **labels) -> float:
    return next(s.value for s in families[family].samples if s.name == sample and labels.items() <= s.labels.items())


def test_metrics_parse_as_prometheus_text_with_the_expected_types(served):
    base, _ = served
    httpx.post(base + "/v1/completions", json={"prompt": "count me", "max_tokens": 3}, timeout=30)
    families = _scrape(base)
    for name in (
        "ringllm_num_requests_running",
        "ringllm_num_requests_waiting",
        "ringllm_kv_cache_usage_ratio",
        "ringllm_kv_cache_slots_used_by_requests",
        "ringllm_prefix_cache_hit_rate",
    ):
        assert families[name].type == "gauge", name
    for name in (
        "ringllm_generation_tokens",
        "ringllm_prompt_tokens_computed",
        "ringllm_preemptions",
        "ringllm_requests",
        "ringllm_prompt_tokens",
    ):
        assert families[name].type == "counter", name  # the parser strips the _total suffix
    for name in (
        "ringllm_time_to_first_token_seconds",
        "ringllm_inter_token_latency_seconds",
        "ringllm_e2e_request_latency_seconds",
    ):
        assert families[name].type == "histogram"
        count = _sample(families, name, name + "_count")
        assert count == _sample(families, name, name + "_bucket", le="+Inf") >= 1
    assert _sample(families, "ringllm_generation_tokens", "ringllm_generation_tokens_total") >= 3


def test_metrics_cover_every_api_worker(served):
    """Two API workers: each scrape reaches one of them, and every scrape must count every request."""
    base, _ = served
    e2e = "ringllm_e2e_request_latency_seconds"
    before = _sample(_scrape(base), e2e, e2e + "_count")
    for i in range(6):
        r = httpx.post(base + "/v1/completions", json={"prompt": f"request {i}", "max_tokens": 2}, timeout=30)
        assert r.status_code == 200
    for _ in range(6):
        families = _scrape(base)
        assert _sample(families, e2e, e2e + "_count") == before + 6
        assert _sample(families, "ringllm_requests", "ringllm_requests_total", finish_reason="length") >= 6


def _greedy_answers(base: str, chat: bool) -> list[str]:
    """What the server answers each question with, greedily, stopping at a newline: the task's targets."""
    answers = []
    for q in QUESTIONS:
        if chat:
            r = httpx.post(
                base + "/v1/chat/completions",
                timeout=30,
                json={"messages": [{"role": "user", "content": q}], "max_tokens": 8, "temperature": 0, "stop": ["\n"]},
            )
            answers.append(r.json()["choices"][0]["message"]["content"])
        else:
            r = httpx.post(
                base + "/v1/completions",
                timeout=30,
                json={"prompt": q, "max_tokens": 8, "temperature": 0, "stop": ["\n"]},
            )
            answers.append(r.json()["choices"][0]["text"])
    return answers


def _write_task(folder: Path, name: str, answers: list[str]) -> None:
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in zip(QUESTIONS, answers)))
    (folder / f"{name}.yaml").write_text(f"""task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps(str(data))}
test_split: train
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: 8
  do_sample: false
  temperature: 0
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
""")


@pytest.mark.skipif(not (BIN / "lm_eval").exists(), reason="lm-evaluation-harness is not installed")
@pytest.mark.parametrize("client", ["local-completions", "local-chat-completions"])
def test_lm_eval_client_scores_the_servers_own_greedy_answers(served, tmp_path, client):
    """A task whose targets are the server's greedy answers: lm-eval must send the prompts and parse the
    generations exactly right to score 1.0."""
    base, _ = served
    chat = client == "local-chat-completions"
    name = "ringllm_tiny_chat" if chat else "ringllm_tiny"
    _write_task(tmp_path, name, _greedy_answers(base, chat))
    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    cmd = [
        str(BIN / "lm_eval"),
        "run",
        "--model",
        client,
        "--model_args",
        f"model=ringllm-demo,base_url={base}{endpoint},tokenizer_backend=none,num_concurrent=2,max_retries=1",
        "--tasks",
        name,
        "--include_path",
        str(tmp_path),
        "--output_path",
        str(tmp_path / "out"),
    ]
    if chat:
        cmd.append("--apply_chat_template")
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"][name]
    assert results["exact_match,none"] == 1.0, results


def _hf_demo(cache):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ringllm.engine.demo import demo_model_path

    path = demo_model_path(cache)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def _hf_token_logprobs(model, ids: list[int]) -> list[float]:
    """log p(ids[i] | ids[:i]) for i >= 1."""
    import torch

    with torch.no_grad():
        lp = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
    return [lp[i - 1, ids[i]].item() for i in range(1, len(ids))]


def test_echo_returns_the_prompt_with_its_logprobs(served):
    base, cache = served
    model, _ = _hf_demo(cache)
    ids = [17, 300, 5, 88, 41, 999, 2]
    r = httpx.post(
        base + "/v1/completions",
        timeout=30,
        json={"prompt": ids, "max_tokens": 2, "temperature": 0, "echo": True, "logprobs": 2},
    )
    choice = r.json()["choices"][0]
    lp = choice["logprobs"]
    prompt_text = httpx.post(base + "/detokenize", json={"tokens": ids}).json()["prompt"]
    assert choice["text"].startswith(prompt_text) and len(lp["tokens"]) == len(ids) + 2
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    # the top 2 and the token itself, as OpenAI and vLLM give them (k + 1 at most)
    assert all(len(top) in (2, 3) and t in top for t, top in zip(lp["tokens"][1:], lp["top_logprobs"][1:]))
    for mine, ref in zip(lp["token_logprobs"][1 : len(ids)], _hf_token_logprobs(model, ids)):
        assert abs(mine - ref) < 1e-3
    usage = r.json()["usage"]
    assert usage["prompt_tokens_details"] is None  # vLLM's null unless --enable-prompt-tokens-details
    assert usage == {"prompt_tokens": len(ids), "completion_tokens": 2, "total_tokens": len(ids) + 2} | {
        "prompt_tokens_details": None
    }
    plain = httpx.post(base + "/v1/completions", timeout=30, json={"prompt": "The sea", "max_tokens": 2, "echo": True})
    assert plain.json()["choices"][0]["text"].startswith("The sea")


@pytest.mark.skipif(not (BIN / "lm_eval").exists(), reason="lm-evaluation-harness is not installed")
def test_lm_eval_loglikelihood_task_agrees_with_transformers(served, tmp_path):
    """A multiple-choice task scored through echo + logprobs: its labels are the choices transformers itself
    finds most likely (each choice's summed logprob, tokenized the way lm-eval does), so only prompt
    logprobs that agree with transformers score 1.0."""
    base, cache = served
    model, tok = _hf_demo(cache)
    docs = [
        ("The sea is", ["wide", "blue", "cold"]),
        ("Once upon a", ["time", "hill", "river"]),
        ("Two and two", ["make four", "is five", "say three"]),
        ("A small fast", ["server", "horse"]),
    ]
    labels = []
    for question, choices in docs:
        scores = []
        for choice in choices:
            context = tok.encode(question)
            whole = tok.encode(question + " " + choice)
            scores.append(sum(_hf_token_logprobs(model, whole)[len(context) - 1 :]))
        labels.append(max(range(len(choices)), key=scores.__getitem__))
    data = tmp_path / "choice.jsonl"
    data.write_text(
        "".join(json.dumps({"question": q, "choices": c, "label": lab}) + "\n" for (q, c), lab in zip(docs, labels))
    )
    (tmp_path / "ringllm_choice.yaml").write_text(f"""task: ringllm_choice
dataset_path: json
dataset_kwargs:
  data_files: {json.dumps(str(data))}
test_split: train
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: "{{{{label}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    from ringllm.engine.demo import demo_model_path

    cmd = [
        str(BIN / "lm_eval"),
        "run",
        "--model",
        "local-completions",
        "--model_args",
        f"model=ringllm-demo,base_url={base}/v1/completions,tokenizer_backend=huggingface,"
        f"tokenizer={demo_model_path(cache)},num_concurrent=2,max_retries=1",
        "--tasks",
        "ringllm_choice",
        "--include_path",
        str(tmp_path),
        "--output_path",
        str(tmp_path / "out"),
    ]
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(next((tmp_path / "out").rglob("results_*.json")).read_text())["results"]["ringllm_choice"]
    assert results["acc,none"] == 1.0, (results, labels)
