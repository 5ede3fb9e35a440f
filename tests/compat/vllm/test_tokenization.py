# SPDX-License-Identifier: Apache-2.0
# Ported from vLLM's tests/entrypoints/openai/test_tokenization.py (Copyright contributors to the vLLM project),
# at the commit named in tests/compat/vllm/README.md, to run against `ringllm serve` on the suite's real model.
# Adaptations are marked `# ringllm adaptation:` and listed in the README.
import pytest
import requests

from tests.compat.vllm.utils import DEFAULT_ARGS, MODEL_NAME, real_server

CONVERSATION = [
    {"role": "user", "content": "Hi there!"},
    {"role": "assistant", "content": "Nice to meet you!"},
    {"role": "user", "content": "Can I ask a question? vllm1"},
]
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"location": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def server(default_server):
    # vLLM: zephyr-7b-beta, --dtype bfloat16 --max-model-len 8192 --enforce-eager --max-num-seqs 128
    # --enable-tokenizer-info-endpoint, one server for the module. ringllm adaptation: /tokenize and /detokenize
    # on the shared default server; only the /tokenizer_info tests get a server with the option.
    return default_server


@pytest.fixture(scope="module")
def info_server(real_model, server_logs):
    with real_server(real_model, server_logs, [*DEFAULT_ARGS, "--enable-tokenizer-info-endpoint"]) as remote:
        yield remote


def tokenize(server, body: dict) -> dict:
    response = requests.post(server.url_for("tokenize"), json=body)
    response.raise_for_status()
    return response.json()


def chat_cases():
    """(add_generation_prompt, add_special_tokens, continue_final_message, conversation), as vLLM's loops make
    them: continue_final_message appends an unfinished assistant turn (and the conversation keeps it)."""
    for add_generation in (False, True):
        for add_special in (False, True):
            conversation = list(CONVERSATION)
            for continue_final in (False, True):
                if add_generation and continue_final:
                    continue
                if continue_final:
                    conversation.append({"role": "assistant", "content": "Sure,"})
                yield add_generation, add_special, continue_final, list(conversation)


@pytest.mark.asyncio
async def test_tokenize_completions(server, tokenizer):
    for add_special in (False, True):
        prompt = "vllm1 This is a test prompt."
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        result = tokenize(server, {"add_special_tokens": add_special, "model": MODEL_NAME, "prompt": prompt})
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == 8192
        assert result["token_strs"] is None


@pytest.mark.asyncio
async def test_tokenize_chat(server, tokenizer):
    for add_generation, add_special, continue_final, conversation in chat_cases():
        prompt = tokenizer.apply_chat_template(
            conversation=conversation,
            add_generation_prompt=add_generation,
            continue_final_message=continue_final,
            tokenize=False,
        )
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        result = tokenize(
            server,
            {
                "add_generation_prompt": add_generation,
                "continue_final_message": continue_final,
                "add_special_tokens": add_special,
                "messages": conversation,
                "model": MODEL_NAME,
            },
        )
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == 8192
        assert result["token_strs"] is None


@pytest.mark.asyncio
async def test_tokenize_chat_with_tools(server, tokenizer):
    for add_generation, add_special, continue_final, _ in chat_cases():
        conversation = [{"role": "user", "content": "What's the weather like in Paris today?"}]
        if continue_final:
            conversation.append({"role": "assistant", "content": "Sure,"})
        prompt = tokenizer.apply_chat_template(
            conversation=conversation,
            tools=WEATHER_TOOLS,
            add_generation_prompt=add_generation,
            continue_final_message=continue_final,
            tokenize=False,
        )
        tokens = tokenizer.encode(prompt, add_special_tokens=add_special)
        result = tokenize(
            server,
            {
                "add_generation_prompt": add_generation,
                "continue_final_message": continue_final,
                "add_special_tokens": add_special,
                "messages": conversation,
                "model": MODEL_NAME,
                "tools": WEATHER_TOOLS,
            },
        )
        assert result["tokens"] == tokens
        assert result["count"] == len(tokens)
        assert result["max_model_len"] == 8192
        assert result["token_strs"] is None


@pytest.mark.asyncio
async def test_tokenize_with_return_token_strs(server, tokenizer):
    prompt = "This is a token_strs test prompt! vllm1"
    result = tokenize(server, {"prompt": prompt, "model": MODEL_NAME, "return_token_strs": True})
    tokens = tokenizer.encode(prompt, add_special_tokens=True)
    assert result["tokens"] == tokens
    assert result["count"] == len(tokens)
    assert result["max_model_len"] == 8192
    assert result["token_strs"] == tokenizer.convert_ids_to_tokens(tokens)


@pytest.mark.asyncio
async def test_detokenize(server, tokenizer):
    prompt = "This is a test prompt. vllm1"
    tokens = tokenizer.encode(prompt, add_special_tokens=False)
    response = requests.post(server.url_for("detokenize"), json={"model": MODEL_NAME, "tokens": tokens})
    response.raise_for_status()
    assert response.json() == {"prompt": prompt}


def tokenizer_info(server) -> dict:
    response = requests.get(server.url_for("tokenizer_info"))
    response.raise_for_status()
    return response.json()


@pytest.mark.asyncio
async def test_tokenizer_info_basic(info_server):
    result = tokenizer_info(info_server)
    assert isinstance(result.get("tokenizer_class"), str) and result["tokenizer_class"]


@pytest.mark.asyncio
async def test_tokenizer_info_schema(info_server):
    result = tokenizer_info(info_server)
    field_types = {
        "add_bos_token": bool,
        "add_prefix_space": bool,
        "clean_up_tokenization_spaces": bool,
        "split_special_tokens": bool,
        "bos_token": str,
        "eos_token": str,
        "pad_token": str,
        "unk_token": str,
        "chat_template": str,
        "errors": str,
        "model_max_length": int,
        "additional_special_tokens": list,
        "added_tokens_decoder": dict,
    }
    for field, expected in field_types.items():
        if result.get(field) is not None:
            assert isinstance(result[field], expected), f"{field} should be {expected.__name__}"


@pytest.mark.asyncio
async def test_tokenizer_info_added_tokens_structure(info_server):
    for token_id, info in (tokenizer_info(info_server).get("added_tokens_decoder") or {}).items():
        assert isinstance(token_id, str), "Token IDs should be strings"
        assert isinstance(info, dict), "Token info should be a dict"
        assert "content" in info and "special" in info
        assert isinstance(info["special"], bool)


@pytest.mark.asyncio
async def test_tokenizer_info_consistency_with_tokenize(info_server):
    info = tokenizer_info(info_server)
    tokenized = tokenize(info_server, {"model": MODEL_NAME, "prompt": "Hello world!"})
    info_max, tokenize_max = info.get("model_max_length"), tokenized.get("max_model_len")
    if info_max and tokenize_max:
        assert info_max >= tokenize_max, "Info max length should be >= tokenize max length"


@pytest.mark.asyncio
async def test_tokenizer_info_chat_template(info_server):
    template = tokenizer_info(info_server).get("chat_template")
    if template:
        assert isinstance(template, str) and template.strip()
