"""Request-path defects (issues 12 and 19), each reproduced on the demo model over loopback: stop strings and
the engine, ring backpressure, API worker death, hostile bodies, usage, BOS, /tokenize, auth and /schema,
worker-pair claims, limits on n and seeds, big prompts, Content-Type."""

import json
import shutil

import httpx
import pytest

from tests.helpers import metric, start_server, stop_server, wait_for_metric

RUNNING = "ringllm_num_requests_running"
GENERATED = "ringllm_generation_tokens_total"
MAX_WAITING = 600


def _bos_checkpoint(demo_path, out):
    """The demo checkpoint with a tokenizer that adds a BOS token (<|endoftext|>) to text, as Llama's do."""
    shutil.copytree(demo_path, out)
    tj = json.loads((out / "tokenizer.json").read_text())
    bos_id = next(t["id"] for t in tj["added_tokens"] if t["content"] == "<|endoftext|>")
    tj["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": "<|endoftext|>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"<|endoftext|>": {"id": "<|endoftext|>", "ids": [bos_id], "tokens": ["<|endoftext|>"]}},
    }
    (out / "tokenizer.json").write_text(json.dumps(tj))
    cfg = json.loads((out / "tokenizer_config.json").read_text())
    cfg.update(add_bos_token=True, bos_token="<|endoftext|>")
    (out / "tokenizer_config.json").write_text(json.dumps(cfg))
    return out, bos_id


@pytest.fixture(scope="module")
def bos_model(demo_path, tmp_path_factory):
    return _bos_checkpoint(demo_path, tmp_path_factory.mktemp("bos") / "demo-bos")


@pytest.fixture(scope="module")
def server(tmp_path_factory, bos_model):
    """One API worker (so that /health shares the event loop of the request under test), a context long
    enough for 4,000-token prompts, and a queue bound the fan-out tests can exceed."""
    cache = tmp_path_factory.mktemp("defects")
    proc, base = start_server(cache, "--model", str(bos_model[0]), "--served-model-name", "demo",
                              "--kv-cache-tokens", "16384", "--context-len", "4096",
                              "--max-waiting-requests", str(MAX_WAITING))
    yield base
    stop_server(proc)


def _complete(base, timeout=60, **body):
    return httpx.post(base + "/v1/completions", json=body, timeout=timeout)


# ---- issue 12.1 ----
def test_a_stop_string_ends_the_request_in_the_engine(server):
    body = dict(prompt="The sea is", temperature=0, ignore_eos=True)
    full = _complete(server, max_tokens=16, **body).json()["choices"][0]["text"]
    stop = full[4:6]
    assert len(stop) == 2, full
    wait_for_metric(server, RUNNING, 0, 30)
    before = metric(server, GENERATED)
    r = _complete(server, max_tokens=300, stop=[stop], **body).json()
    assert r["choices"][0]["finish_reason"] == "stop" and r["choices"][0]["text"] == full[: full.find(stop)]
    assert wait_for_metric(server, RUNNING, 0, 120) == 0
    assert metric(server, GENERATED) - before < 100  # not the 300 the engine would generate on its own
