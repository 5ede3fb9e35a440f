"""API keys on `ringllm serve` (demo model, loopback): routes guarded unless public, authentication before
validation, the Bearer scheme case-insensitive; and /tokenize on that server, whose model has no chat template."""

import json
import shutil

import httpx
import pytest

from tests.helpers import start_server, stop_server

# ---- issues 12.13 and 19.13 ----
KEY = "s3cret"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, demo_path):
    """An API key with /health and the OpenAPI document public; the demo model without its chat template."""
    cache = tmp_path_factory.mktemp("keyed")
    model = cache / "no-template"
    shutil.copytree(demo_path, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    del cfg["chat_template"]
    (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    proc, base = start_server(
        cache,
        "--model",
        str(model),
        "--kv-cache-tokens",
        "1024",
        "--context-len",
        "64",
        "--api-key",
        KEY,
        "--public-routes",
        "/health,/schema/openapi.json",
    )
    yield base
    stop_server(proc)


def test_schema_routes_need_the_key_unless_public(keyed):
    for path in ("/schema", "/schema/swagger", "/schema/openapi.yaml"):
        r = httpx.get(keyed + path, timeout=10)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error", (path, r.text)
        assert httpx.get(keyed + path, headers={"authorization": f"Bearer {KEY}"}, timeout=10).status_code == 200
    assert httpx.get(keyed + "/schema/openapi.json", timeout=10).status_code == 200  # listed public
    assert httpx.get(keyed + "/health", timeout=10).status_code == 200


@pytest.mark.parametrize("raw", [b"{", b'{"prompt": 5}', b"[" * 100_000 + b"]" * 100_000, b"x" * 1000])
def test_authentication_comes_before_validation(keyed, raw):
    r = httpx.post(keyed + "/v1/completions", content=raw, headers={"content-type": "text/plain"}, timeout=30)
    assert r.status_code == 401, r.text
    assert "prompt" not in r.text


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_the_bearer_scheme_is_case_insensitive(keyed, scheme):
    r = httpx.post(
        keyed + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"authorization": f"{scheme} {KEY}"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    bad = httpx.post(
        keyed + "/v1/completions",
        json={"prompt": "x", "max_tokens": 1},
        headers={"authorization": f"{scheme} {KEY}x"},
        timeout=30,
    )
    assert bad.status_code == 401


# ---- issue 12.8 ----
def test_tokenize_messages_without_a_chat_template_is_a_400(keyed):
    auth = {"authorization": f"Bearer {KEY}"}
    r = httpx.post(
        keyed + "/tokenize", json={"messages": [{"role": "user", "content": "hi"}]}, headers=auth, timeout=10
    )
    assert r.status_code == 400 and "chat template" in r.json()["error"]["message"], r.text
    assert httpx.post(keyed + "/tokenize", json={"prompt": "hi"}, headers=auth, timeout=10).status_code == 200


def test_api_key(tmp_path):
    proc, base = start_server(tmp_path, "--kv-cache-tokens", "1024", "--context-len", "64", "--api-key", "s3cret")
    try:
        body = {"prompt": "x", "max_tokens": 2}
        assert httpx.post(base + "/v1/completions", json=body).status_code == 401
        bad = httpx.post(base + "/v1/completions", json=body, headers={"authorization": "Bearer nope"})
        assert bad.status_code == 401 and bad.json()["error"]["type"] == "authentication_error"
        ok = httpx.post(base + "/v1/completions", json=body, headers={"authorization": "Bearer s3cret"})
        assert ok.status_code == 200
    finally:
        stop_server(proc)
