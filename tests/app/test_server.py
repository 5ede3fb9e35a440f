"""The HTTP layer in this process (no server, no engine): create_app from WorkerSettings, the thin routes over
the serving objects (a FakeEngine behind them), errors in OpenAI's shape naming their field, and what the
settings shape (API key, CORS, profiler routes)."""

from __future__ import annotations

import json

import pytest
from litestar.testing import TestClient

from ringllm.app.server import create_app
from ringllm.app.settings import ENV_VAR, WorkerSettings
from ringllm.app.worker import Services
from tests.app.conftest import FakeStatus


def _settings(tokenizer_dir, **fields) -> WorkerSettings:
    base = dict(engine_pids=[1], workers=1, max_seq_len=1024, served_models=["m", "other-name"])
    base["allowed_hosts"] = ["testserver.local"]  # Litestar's TestClient's Host
    paths = dict(model_path=str(tokenizer_dir), tokenizer_path=str(tokenizer_dir))
    return WorkerSettings(**{**base, **paths, **fields})


@pytest.fixture
def served(build, tokenizer_dir):
    """(a TestClient of the app over a FakeEngine, the Serving behind it)."""

    def make(**fields):
        serving = build(**fields)
        serving.status = FakeStatus()
        services = Services(serving.model, serving.completions, serving.chat, serving.tokenize, serving.status)
        return TestClient(create_app(_settings(tokenizer_dir, **fields), services)), serving

    return make


def test_the_routes_answer_through_the_serving_objects(served):
    client, _ = served()
    r = client.post("/v1/completions", json={"prompt": "The sea", "max_tokens": 3}, headers={"x-request-id": "abc"})
    assert r.status_code == 200 and r.json()["id"] == "cmpl-abc" and r.json()["usage"]["completion_tokens"] == 3
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], "stream": True})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    assert r.text.endswith("data: [DONE]\n\n") and "\r\n" not in r.text
    assert json.loads(r.text.split("\n\n")[0][6:])["choices"][0]["delta"]["role"] == "assistant"
    assert [m["id"] for m in client.get("/v1/models").json()["data"]] == ["m", "other-name"]
    tokens = client.post("/tokenize", json={"prompt": "The sea"}).json()["tokens"]
    assert client.post("/detokenize", json={"tokens": tokens}).json() == {"prompt": "The sea"}
    assert client.get("/health").status_code == 200 and client.get("/metrics").text.startswith("ringllm_")


@pytest.mark.parametrize(
    "body,status,param",
    [
        ({"prompt": "x", "model": "nope"}, 404, "model"),
        ({"prompt": "x", "max_tokens": 5000}, 400, "max_tokens"),
        ({"prompt": "x", "structured_outputs": {"regex": "a", "choice": ["b"]}}, 400, "structured_outputs"),
        ({"prompt": "x", "structured_outputs": {"json": "[1]"}}, 400, "structured_outputs.json"),
        ({"prompt": "x", "no_such_field": 2}, 400, "no_such_field"),  # an unknown field, by its name
        ({"prompt": "x", "temperature": "hot"}, 400, "temperature"),
        ({"prompt": "x", "temperature": 5}, 400, "temperature"),
        ({"prompt": "x", "stop_token_ids": [-1]}, 400, "stop_token_ids[0]"),
        ({"prompt": "x", "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ],
)
def test_errors_come_back_in_openais_shape_naming_the_field(served, body, status, param):
    client, serving = served()
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == param, r.text
    assert serving.engine.submitted == []


def test_x_request_id_comes_back_only_with_enable_request_id_headers(served):
    # As vLLM: the header only with the option; the id names the response either way (the client's, if sane).
    client, _ = served()
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"x-request-id": "abc"})
    assert "x-request-id" not in r.headers and r.json()["id"] == "cmpl-abc"
    assert "x-request-id" not in client.get("/health").headers
    client, _ = served(request_id_headers=True)
    r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"x-request-id": "abc"})
    assert r.headers["x-request-id"] == "abc" and r.json()["id"] == "cmpl-abc"
    made = client.get("/health").headers["x-request-id"]
    assert len(made) == 32 and int(made, 16) >= 0
    assert client.get("/no/such/route", headers={"x-request-id": "gone"}).headers["x-request-id"] == "gone"


@pytest.mark.parametrize(
    "path,body",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 1}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
        ("/invocations", {"prompt": "x", "max_tokens": 1}),
    ],
)
def test_an_orca_load_report_comes_with_a_whole_answer_that_asks_for_one(served, path, body):
    # vLLM's: endpoint-load-metrics-format TEXT or JSON in, endpoint-load-metrics out, with the engines' load.
    client, _ = served()
    ask = "endpoint-load-metrics-format"
    text = client.post(path, json=body, headers={ask: "TEXT"}).headers["endpoint-load-metrics"]
    assert text == (
        "TEXT named_metrics.kv_cache_usage_perc=0.25, named_metrics.num_requests_waiting=1.0, "
        "named_metrics.num_requests_running=2.0"
    )
    report = client.post(path, json=body, headers={ask: "json"}).headers["endpoint-load-metrics"]
    assert report.startswith("JSON ") and json.loads(report[5:]) == {
        "named_metrics": {"kv_cache_usage_perc": 0.25, "num_requests_waiting": 1.0, "num_requests_running": 2.0}
    }
    # none unasked, none for a format vLLM does not write either, none on a stream (its headers went out first)
    assert "endpoint-load-metrics" not in client.post(path, json=body).headers
    assert "endpoint-load-metrics" not in client.post(path, json=body, headers={ask: "BINARY"}).headers
    streamed = client.post(path, json={**body, "stream": True}, headers={ask: "TEXT"})
    assert streamed.status_code == 200 and "endpoint-load-metrics" not in streamed.headers


def test_the_api_key_and_the_public_routes(served):
    client, _ = served(api_key="sekret", public_routes=["/health"])
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401
    assert client.get("/metrics").status_code == 401 and client.get("/health").status_code == 200
    ok = client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 1}, headers={"authorization": "bearer sekret"}
    )
    assert ok.status_code == 200
    r = client.post("/v1/completions", content=b"prompt=x", headers={"authorization": "Bearer sekret"})
    assert r.status_code == 415 and r.json()["error"]["param"] == "content-type"


def test_cors_only_for_the_allowed_origins(served):
    preflight = {"origin": "http://ok.test", "access-control-request-method": "POST"}
    client, _ = served(allowed_origins=["http://ok.test"])
    r = client.options("/v1/completions", headers=preflight)
    assert r.status_code == 204 and r.headers["access-control-allow-origin"] == "http://ok.test"
    client, _ = served()
    assert (
        "access-control-allow-origin" not in client.post("/tokenize", json={"prompt": "x"}, headers=preflight).headers
    )


def test_the_profiler_routes_exist_only_when_asked_for(served):
    client, _ = served()
    assert client.post("/start_profile").status_code == 404
    client, _ = served(profiler_routes=True)
    assert client.post("/start_profile").json() == {"profiling": True}
    assert client.post("/stop_profile").json() == {"profiling": False}


def test_an_engine_that_cannot_serve_makes_health_a_503_with_retry_after(served):
    client, serving = served()
    serving.status.unavailable = "the server is shutting down"
    r = client.get("/health")
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"] == {
        "message": "the server is shutting down",
        "type": "server_error",
        "param": None,
        "code": None,
    }


def test_create_app_decodes_the_launchers_variable(tokenizer_dir, monkeypatch):
    monkeypatch.setenv(ENV_VAR, _settings(tokenizer_dir, api_key="k").to_environment()[ENV_VAR])
    client = TestClient(create_app())
    assert client.post("/v1/completions", json={"prompt": "x"}).status_code == 401  # the variable's key guards it
    monkeypatch.delenv(ENV_VAR)
    with pytest.raises(RuntimeError, match="started by `ringllm serve`"):
        create_app()


def test_validation_errors_are_a_sentence_naming_the_field(served):
    client, _ = served()
    error = client.post("/v1/completions", json={"prompt": "x", "temperature": 5}).json()["error"]
    # the bound broken, in pydantic's words too (vLLM's clients and tests look for them)
    assert error["message"] == "invalid request body: temperature: Expected `float` <= 2.0 (less_than_equal)", error
    for seed, name in ((-(2**63) - 1, "greater_than_equal"), (2**63, "less_than_equal")):
        error = client.post("/v1/completions", json={"prompt": "x", "seed": seed}).json()["error"]
        assert error["param"] == "seed" and error["message"].endswith(f"({name})"), error
    error = client.post("/v1/completions", json={"prompt": "x", "extra_field": 1}).json()["error"]
    assert error["param"] == "extra_field" and "unknown field `extra_field`" in error["message"]


def test_a_messages_undeclared_keys_reach_the_chat_template(served):
    """As transformers' apply_chat_template passes a message's keys (vLLM accepts them too): a template may read
    keys of its own. The chat route and /tokenize render the same text."""
    template = "{% for m in messages %}<{{ m.role }}|{{ m.mood | default('-') }}>{{ m.content }}{% endfor %}"
    client, serving = served(chat_template=template)
    messages = [{"role": "user", "content": "hi", "mood": "glad", "extra_field": "0"}, {"role": "user", "content": "x"}]
    r = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 2})
    assert r.status_code == 200, r.text
    [(_, ids, _)] = serving.engine.submitted
    assert serving.model.tokenizer.decode(ids) == "<user|glad>hi<user|->x"
    assert client.post("/tokenize", json={"messages": messages}).json()["tokens"] == ids
    # a declared field keeps its type check; an undeclared one cannot replace it
    bad = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": 5}]}).json()["error"]
    assert bad["param"] == "messages[0].content", bad


@pytest.mark.parametrize(
    "path,body,param",
    [
        ("/v1/completions", {"prompt": [1] * 1100}, "prompt"),
        ("/v1/completions", {"prompt": [1] * 100, "max_tokens": 1000}, "max_tokens"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 3000}]}, "messages"),
    ],
)
def test_a_context_overflow_has_openais_words_and_code(served, path, body, param):
    """LiteLLM raises its ContextWindowExceededError on this code and wording; on /v1/completions the prompt is
    named, never "messages"."""
    client, _ = served()
    r = client.post(path, json=body)
    error = r.json()["error"]
    assert r.status_code == 400 and (error["code"], error["param"]) == ("context_length_exceeded", param), error
    assert error["message"].startswith("This model's maximum context length is 1024 tokens. However,")
    assert ("messages" in error["message"]) == (path == "/v1/chat/completions")


def test_vllms_informational_routes(served):
    """/version, /ping (GET and POST, as /health), HEAD /health, and one model of /v1/models by name (an unknown
    one is a 404 in OpenAI's error shape); the listing carries max_model_len."""
    import importlib.metadata

    client, serving = served()
    try:
        version = importlib.metadata.version("ringllm")
    except importlib.metadata.PackageNotFoundError:
        version = "0+unknown"
    assert client.get("/version").json() == {"version": version}
    assert client.get("/ping").status_code == 200 and client.post("/ping").status_code == 200
    head = client.head("/health")
    assert head.status_code == 200 and head.content == b""
    serving.status.unavailable = "the server is shutting down"
    assert client.get("/ping").status_code == 503 and client.post("/ping").status_code == 503
    assert client.head("/health").status_code == 503
    entry = client.get("/v1/models/other-name").json()
    assert entry["id"] == "other-name" and entry["object"] == "model" and entry["max_model_len"] == 1024
    assert client.get("/v1/models").json()["data"][0]["max_model_len"] == 1024
    r = client.get("/v1/models/nope")
    assert r.status_code == 404 and r.json()["error"]["param"] == "model" and "nope" in r.json()["error"]["message"]


def test_invocations_answers_as_the_route_its_body_is_for(served):
    client, serving = served()
    chat = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3, "temperature": 0}
    a, b = client.post("/v1/chat/completions", json=chat).json(), client.post("/invocations", json=chat).json()
    assert a.keys() == b.keys(), b
    assert a["choices"] == b["choices"] and b["object"] == "chat.completion"
    completion = {"prompt": "The sea", "max_tokens": 3, "temperature": 0}
    a, b = client.post("/v1/completions", json=completion).json(), client.post("/invocations", json=completion).json()
    assert a["choices"] == b["choices"] and b["object"] == "text_completion"
    r = client.post("/invocations", json={**completion, "stream": True})
    assert r.headers["content-type"].startswith("text/event-stream") and r.text.endswith("data: [DONE]\n\n")
    submitted = len(serving.engine.submitted)
    r = client.post("/invocations", json={"input": "x"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]
    r = client.post("/invocations", json={"prompt": "x", "max_tokens": -1})
    assert r.status_code == 400 and "max_tokens" in r.json()["error"]["message"]
    assert client.post("/invocations", content=b"{", headers={"content-type": "application/json"}).status_code == 400
    assert len(serving.engine.submitted) == submitted


def test_root_path_serves_every_route_under_the_prefix_too(served):
    client, _ = served(root_path="/llm", api_key="k", public_routes=["/health"])
    assert client.get("/llm/health").status_code == 200 and client.get("/health").status_code == 200
    key = {"authorization": "Bearer k"}
    assert client.get("/llm/v1/models").status_code == 401
    assert client.get("/llm/v1/models", headers=key).json()["data"][0]["id"] == "m"
    assert client.get("/llmx/v1/models", headers=key).status_code == 404


def test_the_load_route_exists_only_with_server_load_tracking(served):
    client, _ = served()
    assert client.get("/load").status_code == 404
    client, _ = served(server_load_tracking=True)
    assert client.get("/load").json() == {"server_load": 0}
    assert client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
    assert client.get("/load").json() == {"server_load": 0}  # counted while in flight only


def test_tokenizer_info_only_with_its_option(served, tokenizer_dir):
    client, _ = served()
    assert client.get("/tokenizer_info").status_code == 404
    client, serving = served(tokenizer_info_route=True)
    info = client.get("/tokenizer_info").json()
    assert isinstance(info["tokenizer_class"], str) and info["model_max_length"] >= 1024
    assert info["chat_template"] == serving.model.tokenizer.template_text
    added = serving.model.tokenizer.backend.get_added_tokens_decoder()
    assert set(info["added_tokens_decoder"]) == {str(i) for i in added}
    for token_id, token in info["added_tokens_decoder"].items():
        assert token["content"] == added[int(token_id)].content and isinstance(token["special"], bool)


def test_the_route_signatures_warn_of_nothing_litestar_3_drops(served):
    """Issue 27 item 13: every body and path parameter is declared with its marker."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        client, _ = served(server_load_tracking=True, tokenizer_info_route=True)
        assert client.post("/tokenize", json={"prompt": "x"}).status_code == 200
        assert client.get("/v1/models/m").status_code == 200
    assert [str(w.message) for w in caught if "Litestar" in type(w.category).__name__ or "litestar" in w.filename] == []


def test_tokenizer_info_and_the_model_listing_name_no_path_on_the_server(served, tokenizer_dir, tmp_path):
    """Issue 28: where the server keeps its files is the operator's. A tokenizer_config.json saved by an older
    transformers holds its files' paths (name_or_path, tokenizer_file): /tokenizer_info leaves them out, and
    /v1/models' root is the checkpoint's name, not its path."""
    import shutil

    checkpoint = tmp_path / "my-checkpoint"
    shutil.copytree(tokenizer_dir, checkpoint)
    config = json.loads((checkpoint / "tokenizer_config.json").read_text())
    config.update(name_or_path=str(checkpoint), tokenizer_file=str(checkpoint / "tokenizer.json"))
    (checkpoint / "tokenizer_config.json").write_text(json.dumps(config))
    client, _ = served(tokenizer_info_route=True, model_path=str(checkpoint), tokenizer_path=str(checkpoint))
    info, models = client.get("/tokenizer_info"), client.get("/v1/models")
    assert info.status_code == 200 and info.json()["eos_token"] == config["eos_token"]  # the rest is there
    assert [m["root"] for m in models.json()["data"]] == ["my-checkpoint"] * 2
    for answer in (info.text, models.text, client.get("/v1/models/m").text):
        assert str(tmp_path) not in answer
