"""vLLM's informational routes beside the OpenAI ones: GET /version, GET /v1/models/{model} (OpenAI's own),
GET /load (with --enable-server-load-tracking) and GET /tokenizer_info (with --enable-tokenizer-info-endpoint).
/ping and /invocations answer as /health and the chat or completions route do: they are in app/server.py."""

from __future__ import annotations

import importlib.metadata
import json
from collections.abc import Callable
from functools import cache

from litestar import get
from litestar.params import FromPath

from ringllm.app.asgi_layers import ServerLoad
from ringllm.app.errors import ApiError
from ringllm.app.served_model import ServedModel
from ringllm.app.settings import WorkerSettings
from ringllm.text.tokenizer import tokenizer_directory


@cache
def ringllm_version() -> str:
    try:
        return importlib.metadata.version("ringllm")
    except importlib.metadata.PackageNotFoundError:  # run from a source tree that was never installed
        return "0+unknown"


def vllm_routes(model: Callable[[], ServedModel], settings: WorkerSettings, load: ServerLoad | None) -> list:
    """The routes; `model` gives the worker's ServedModel once its lifespan has built it."""

    @get("/version")
    async def version() -> dict:
        return {"version": ringllm_version()}

    @get("/v1/models/{name:str}")
    async def model_entry(name: FromPath[str]) -> dict:
        """One model of /v1/models; an unknown name is a 404 in OpenAI's error shape."""
        for entry in model().listing()["data"]:
            if entry["id"] == name:
                return entry
        raise ApiError(404, f"The model `{name}` does not exist.", "not_found_error", "model")

    routes = [version, model_entry]
    if load is not None:

        @get("/load")
        async def server_load() -> dict:
            """This API worker's requests in flight (vLLM's: its API server's)."""
            return {"server_load": load.in_flight}

        routes.append(server_load)
    if settings.tokenizer_info_route:

        @get("/tokenizer_info")
        async def tokenizer_info() -> dict:
            served = model()
            return _tokenizer_info(settings.tokenizer_path, served.tokenizer.template_text, served.max_seq_len)

        routes.append(tokenizer_info)
    return routes


def _a_path(key: str) -> bool:
    """tokenizer_config.json keys that older transformers filled with the files' paths on the machine that saved
    them (`name_or_path`, `tokenizer_file`, `vocab_file`...): where the files are is the operator's (issue 28)."""
    return key == "name_or_path" or key.endswith("_file")


@cache
def _tokenizer_info(tokenizer_path: str, chat_template: str | None, max_seq_len: int) -> dict:
    """vLLM's /tokenizer_info: the tokenizer's configuration (tokenizer_config.json's JSON values), its class,
    the chat template in use and every added token by id. Built once: none of it changes while serving."""
    from tokenizers import Tokenizer as Backend

    directory = tokenizer_directory(tokenizer_path)
    config_file = directory / "tokenizer_config.json"
    config = json.loads(config_file.read_text()) if config_file.is_file() else {}
    info = {k: v for k, v in config.items() if k not in ("added_tokens_decoder", "chat_template") and not _a_path(k)}
    info.setdefault("tokenizer_class", "PreTrainedTokenizerFast")  # what transformers loads tokenizer.json as
    limit = info.get("model_max_length")
    info["model_max_length"] = limit if isinstance(limit, int) and limit >= max_seq_len else max_seq_len
    info["chat_template"] = chat_template
    added = Backend.from_file(str(directory / "tokenizer.json")).get_added_tokens_decoder()
    info["added_tokens_decoder"] = {
        str(token_id): {
            "content": t.content,
            "special": t.special,
            "lstrip": t.lstrip,
            "rstrip": t.rstrip,
            "normalized": t.normalized,
            "single_word": t.single_word,
        }
        for token_id, t in sorted(added.items())
    }
    return info
