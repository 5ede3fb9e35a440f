# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_optional_middleware.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve`.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
"""Middleware that is off by default and turned on by server options: --api-key, --enable-request-id-headers."""

from http import HTTPStatus

import pytest
import requests

from tests.compat.vllm.utils import demo_server


@pytest.fixture(scope="module")
def server(request, default_server, server_logs):
    # vLLM: a small embeddings model (multilingual-e5-small, --runner pooling), since no test here reads a
    # generation. ringllm adaptation: the shared default server for the default options, and ringllm's tiny
    # demo model (seconds to start) for each option under test.
    extra = getattr(request, "param", [])
    extra = [extra] if isinstance(extra, str) else list(extra)
    if not extra:
        yield default_server
        return
    with demo_server(server_logs, ["--max-model-len", "512", "--enforce-eager", "--max-num-seqs", "2", *extra]) as s:
        yield s


@pytest.mark.asyncio
async def test_no_api_token(server):
    assert requests.get(server.url_for("v1/models")).status_code == HTTPStatus.OK


@pytest.mark.asyncio
async def test_no_request_id_header(server):
    assert "X-Request-Id" not in requests.get(server.url_for("health")).headers


@pytest.mark.parametrize("server", [["--api-key", "test"]], indirect=True)
@pytest.mark.asyncio
async def test_missing_api_token(server):
    assert requests.get(server.url_for("v1/models")).status_code == HTTPStatus.UNAUTHORIZED


@pytest.mark.parametrize("server", [["--api-key", "test"]], indirect=True)
@pytest.mark.asyncio
async def test_passed_api_token(server):
    response = requests.get(server.url_for("v1/models"), headers={"Authorization": "Bearer test"})
    assert response.status_code == HTTPStatus.OK


@pytest.mark.parametrize("server", [["--api-key", "test"]], indirect=True)
@pytest.mark.asyncio
async def test_not_v1_api_token(server):
    # Only /v1 paths need the key.
    assert requests.get(server.url_for("health")).status_code == HTTPStatus.OK


@pytest.mark.parametrize("server", ["--enable-request-id-headers"], indirect=True)
@pytest.mark.asyncio
async def test_enable_request_id_header(server):
    response = requests.get(server.url_for("health"))
    assert "X-Request-Id" in response.headers
    assert len(response.headers.get("X-Request-Id", "")) == 32


@pytest.mark.parametrize("server", ["--enable-request-id-headers"], indirect=True)
@pytest.mark.asyncio
async def test_custom_request_id_header(server):
    response = requests.get(server.url_for("health"), headers={"X-Request-Id": "Custom"})
    assert response.headers.get("X-Request-Id") == "Custom"
