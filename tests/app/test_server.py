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
        ({"prompt": "x", "no_such_field": 2}, 400, None),  # an unknown field: msgspec names it in the message
    ],
)
def test_errors_come_back_in_openais_shape_naming_the_field(served, body, status, param):
    client, serving = served()
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert r.json()["error"]["param"] == param, r.text
    assert serving.engine.submitted == []


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
