"""Structured outputs through `ringllm serve` on the demo model: the official client's parse(), response_format
json_schema on completions and chat (streamed or not), vLLM's names for the constraints, and bad constraints as
400s. Offline and in the engine: tests/engine/test_structured_output.py."""

import json

import httpx
import jsonschema_rs
import pytest

from tests.helpers import start_server, stop_server

# Nested objects, enums, arrays and bounded scalars: a bounded schema, so that every output ends well within
# max_tokens (whitespace between elements is bounded by the engine too).
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 12},
        "kind": {"enum": ["cat", "dog", "bird"]},
        "tags": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 99}, "maxItems": 3},
        "owner": {
            "type": "object",
            "additionalProperties": False,
            "required": ["ok", "age"],
            "properties": {"ok": {"type": "boolean"}, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
        },
    },
    "required": ["name", "kind", "tags", "owner"],
    "additionalProperties": False,
}


# ---- batching: constrained rows do not change the others, whatever the overlap ----
# ---- through the server ----
@pytest.fixture(scope="module")
def server(tmp_path_factory):
    proc, base = start_server(
        tmp_path_factory.mktemp("structured"), "--kv-cache-tokens", "8192", "--context-len", "1024"
    )
    yield base
    stop_server(proc)


def test_official_client_parse_returns_a_parsed_object(server):
    from typing import Literal

    from openai import OpenAI
    from pydantic import BaseModel, Field

    class Owner(BaseModel):
        ok: bool
        age: int = Field(ge=0, le=120)

    class Pet(BaseModel):
        name: str = Field(max_length=12)
        kind: Literal["cat", "dog", "bird"]
        owner: Owner

    client = OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=120)
    for seed in range(2):
        completion = client.chat.completions.parse(
            model=client.models.list().data[0].id,
            response_format=Pet,
            temperature=1.0,
            seed=seed,
            max_tokens=400,
            messages=[{"role": "user", "content": "Describe a pet as JSON."}],
        )
        pet = completion.choices[0].message.parsed
        assert completion.choices[0].finish_reason == "stop" and isinstance(pet, Pet), completion


@pytest.mark.parametrize(
    "path,body,stream",
    [
        ("/v1/completions", {"prompt": "A pet:"}, False),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "A pet?"}]}, True),
    ],
)
def test_response_format_json_schema_on_completions_and_chat(server, path, body, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "pet", "schema": SCHEMA, "strict": True}}
    for seed in range(2):
        r = httpx.post(
            server + path,
            json={**body, "response_format": fmt, "seed": seed, "max_tokens": 400, "stream": stream},
            timeout=120,
        )
        assert r.status_code == 200, r.text
        jsonschema_rs.validate(SCHEMA, json.loads(_text(r, stream)))


def _text(r, stream: bool) -> str:
    if not stream:
        choice = r.json()["choices"][0]
        assert choice["finish_reason"] == "stop", choice
        return choice["text"] if "text" in choice else choice["message"]["content"]
    text = ""
    for line in r.text.splitlines():
        if line.startswith("data: {"):
            for c in json.loads(line[6:])["choices"]:
                text += c.get("text") or (c.get("delta") or {}).get("content") or ""
    return text


def test_vllm_names_constrain_too(server):
    for extra, check in [
        ({"guided_choice": ["red", "green"]}, lambda t: t in ("red", "green")),
        ({"guided_regex": "[0-9]{4}"}, lambda t: len(t) == 4 and t.isdigit()),
        ({"structured_outputs": {"choice": ["up", "down"]}}, lambda t: t in ("up", "down")),
    ]:
        r = httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 20, **extra}, timeout=60)
        assert r.status_code == 200 and check(r.json()["choices"][0]["text"]), (extra, r.text)


@pytest.mark.parametrize(
    "body,field",
    [
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "foo"}}}},
            "response_format",
        ),
        ({"guided_json": "not json"}, "guided_json"),
        ({"guided_regex": "(?<=a)b"}, "regex"),  # passes the API worker, refused by the engine's compiler
        ({"guided_regex": "a", "guided_choice": ["b"]}, "guided"),
        ({"guided_choice": []}, "guided_choice"),  # built by the API worker: its bounds are checked there too
        ({"response_format": {"type": "xml"}}, "response_format"),
        ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "exactly one"),
    ],
)
def test_bad_constraints_are_400(server, body, field):
    r = httpx.post(server + "/v1/completions", json={"prompt": "x", **body}, timeout=60)
    assert r.status_code == 400 and field in r.json()["error"]["message"], r.text
    assert httpx.post(server + "/v1/completions", json={"prompt": "x", "max_tokens": 2}).status_code == 200
