# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_uds.py (Copyright contributors to the vLLM project), at the
# commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
import importlib.metadata

import httpx
import pytest

from tests.compat.vllm.utils import DEFAULT_ARGS, real_server


@pytest.fixture(scope="module")
def server(real_model, server_logs, tmp_path_factory):
    # vLLM: Qwen3-0.6B, the common arguments and --uds <dir>/vllm.sock (the server listens on a unix socket).
    socket = tmp_path_factory.mktemp("uds") / "vllm.sock"
    with real_server(real_model, server_logs, [*DEFAULT_ARGS, "--uds", str(socket)]) as remote:
        remote.uds = str(socket)
        yield remote


@pytest.mark.asyncio
async def test_show_version(server):
    client = httpx.Client(transport=httpx.HTTPTransport(uds=server.uds))
    response = client.get("http://localhost/version")
    response.raise_for_status()
    # ringllm adaptation: the server reports its own version (vLLM's test expects vLLM's __version__).
    assert response.json() == {"version": importlib.metadata.version("ringllm")}
