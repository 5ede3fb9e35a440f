# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/v1/entrypoints/openai/test_chat_completion.py (Copyright contributors to the vLLM
# project), at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real
# model. Adaptations are marked `# ringllm adaptation:` and listed in the README.
"""Invalid structured-output constraints on the chat route are 400s."""

import openai
import pytest

from tests.compat.vllm.utils import MODEL_NAME

INVALID_JSON_SCHEMA = {
    "$defs": {"CarType": {"enum": ["sedan", "SUV", "Truck", "Coupe"], "title": "CarType", "type": "string"}},
    "properties": {
        "brand": {"title": "Brand", "type": "string"},
        "model": {"title": "Model", "type": "string"},
        "car_type": {"$ref": "#/$defs/CarType"},
        "foo": "bar",  # not a schema
    },
    "required": ["brand", "model", "car_type"],
    "title": "CarDescription",
    "type": "object",
}
INVALID_SQL_GRAMMAR = """
    root ::= select_statementinvalidsyntax

    select_statement ::= "SELECT " column " from " table " where " condition

    column ::= "col_1 " | "col_2 "

    table ::= "table_1 " | "table_2 "

    condition ::= column "= " number

    number ::= "1 " | "2 "
"""


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: Qwen2.5-1.5B-Instruct, --max-model-len 2048 --max-num-seqs 128 --enforce-eager. ringllm adaptation:
    # the shared default server.
    return default_server


@pytest.fixture
async def client(server):
    async with server.get_async_client() as async_client:
        yield async_client


async def refused(client, prompt: str, **extra_body) -> None:
    with pytest.raises((openai.BadRequestError, openai.APIError)):
        await client.chat.completions.create(
            model=MODEL_NAME, messages=[{"role": "user", "content": prompt}], extra_body=extra_body
        )


@pytest.mark.asyncio
async def test_invalid_json_schema(client):
    prompt = "Generate a JSON with the brand, model and car_type ofthe most iconic car from the 90's"
    await refused(client, prompt, structured_outputs={"json": INVALID_JSON_SCHEMA})


@pytest.mark.asyncio
async def test_invalid_regex(client):
    prompt = (
        "Generate an email address for Alan Turing, who works in Enigma.End in .com and new line. Example result:"
        "alan.turing@enigma.com\n"
    )
    await refused(client, prompt, structured_outputs={"regex": r"[.*"}, stop=["\n"])


@pytest.mark.asyncio
async def test_invalid_grammar(client):
    prompt = "Generate an SQL query to show the 'username' and 'email'from the 'users' table."
    await refused(client, prompt, structured_outputs={"grammar": INVALID_SQL_GRAMMAR})


@pytest.mark.asyncio
async def test_empty_grammar(client):
    await refused(client, "Say hello", structured_outputs={"grammar": ""})
