# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_shutdown.py (Copyright contributors to the vLLM project), at the
# commit named in tests/compat/vllm/README.md, to run against `ringllm serve`.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
import time

import openai
import pytest

from tests.compat.vllm.utils import demo_server


@pytest.mark.asyncio
async def test_shutdown_on_engine_failure(server_logs):
    """Once the server process is killed, API calls fail (a connection error or an error status)."""
    # vLLM: a tiny random Llama (hmellor/tiny-random-LlamaForCausalLM), --dtype bfloat16 --max-model-len 128
    # --enforce-eager --gpu-memory-utilization 0.05 --max-num-seqs 2 --disable-frontend-multiprocessing, started
    # by hand with a 30 s bound. ringllm adaptation: ringllm's tiny random demo model, started by the harness
    # (waits for /health with the suite's start-up bound, and owns the process group); no
    # --disable-frontend-multiprocessing (ringllm has one process layout).
    server = demo_server(server_logs, ["--max-model-len", "128", "--enforce-eager", "--max-num-seqs", "2"])
    client = openai.AsyncOpenAI(base_url=server.url_for("v1"), api_key="dummy", max_retries=0, timeout=10)
    try:
        served = (await client.models.list()).data[0].id
        await client.completions.create(model=served, prompt="Hello", max_tokens=1)  # it serves

        server.proc.terminate()  # SIGTERM to the server process, as vLLM's test does
        time.sleep(1)
        with pytest.raises((openai.APIConnectionError, openai.APIStatusError)):
            await client.completions.create(model=served, prompt="This should fail", max_tokens=1)
        assert server.proc.wait(timeout=5) is not None
    finally:
        await client.close()
        server.close()
