"""`ringllm serve --skip-tokenizer-init` (vLLM's option) on a checkpoint that has no tokenizer at all: the API
workers load none, prompts come as token ids and answers go back as token ids with empty text; what needs text is a
400 naming the option."""

import json
import shutil

import httpx

from tests.helpers import serving


def test_a_checkpoint_without_tokenizer_files_serves_token_ids(demo_path, tmp_path):
    model = tmp_path / "no-tokenizer"
    shutil.copytree(demo_path, model, ignore=shutil.ignore_patterns("tokenizer*"))
    assert not list(model.glob("tokenizer*"))
    with serving(tmp_path, "--model", str(model), "--skip-tokenizer-init", "--context-len", "256") as (_, base):
        body = {"prompt": [5, 6, 7], "max_tokens": 4, "ignore_eos": True, "return_token_ids": True, "temperature": 0}
        r = httpx.post(base + "/v1/completions", json=body, timeout=120)
        assert r.status_code == 200, r.text
        [choice] = r.json()["choices"]
        assert choice["text"] == "" and len(choice["token_ids"]) == 4 and choice["prompt_token_ids"] == [5, 6, 7]
        assert r.json()["usage"]["completion_tokens"] == 4
        with httpx.stream("POST", base + "/v1/completions", json={**body, "stream": True}, timeout=120) as s:
            events = [json.loads(line[6:]) for line in s.iter_lines() if line.startswith("data: {")]
        assert [t for e in events for t in e["choices"][0]["token_ids"]] == choice["token_ids"]  # greedy: the same
        assert all(e["choices"][0]["text"] == "" for e in events)
        refused = [
            ("/v1/completions", {"prompt": "The sea", "max_tokens": 2}, "prompt"),
            ("/v1/completions", {"prompt": [5], "stop": ["x"]}, "stop"),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}, "messages"),
            ("/tokenize", {"prompt": "The sea"}, None),
        ]
        for path, request, param in refused:
            r = httpx.post(base + path, json=request, timeout=60)
            error = r.json()["error"]
            assert r.status_code == 400 and "--skip-tokenizer-init" in error["message"], (path, r.text)
            assert error["param"] == param, (path, error)
