"""Command-line options generated from config dataclasses, so that each option's default, help text, aliases
and allowed values are written once, on the field (`engine.config.setting`).

`add_options(parser, EngineConfig)` adds `--field-name` (and the field's aliases) for every field;
`from_args(EngineConfig, args)` builds the config back; `read_environment(parser)` lets every option of a
parser, generated or not, be set by RINGLLM_<DEST> (the command line wins over the environment), and
`unknown_variables` names the RINGLLM_ variables that are neither an option's nor one of OTHER_VARIABLES."""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import os
import types
import typing
from collections.abc import Iterator, Mapping
from typing import Any

from ringllm.app.reasoning import PARSERS as REASONING_PARSERS
from ringllm.app.tool_calls import PARSERS as TOOL_PARSERS
from ringllm.engine.config import setting
from ringllm.ipc.sampling import MAX_LOGPROBS

ENV_PREFIX = "RINGLLM_"
_TRUE, _FALSE = {"1", "true", "yes", "on"}, {"0", "false", "no", "off"}

# The RINGLLM_ variables that are not options, and who reads them. Any other RINGLLM_ variable that is not an
# option's is named in a warning at start (a misspelt option would otherwise be ignored without a word).
OTHER_VARIABLES = {
    "RINGLLM_CACHE": "where the demo model, GGUF tokenizers and the tests' real model are kept",
    "RINGLLM_NO_PROGRESS": "1: no progress bars while weights load and CUDA graphs are captured",
    "RINGLLM_TORCH": "the torch requirement scripts/setup.sh installs",
    "RINGLLM_SOAK_SECONDS": "how long scripts/soak.sh runs",
    "RINGLLM_SOAK_MAX_GAP": "the longest gap between tokens scripts/soak.sh allows a normal stream beside the abuse",
}


def comma_list(text: str) -> list[str]:
    """'a,b' or a JSON list '["a", "b"]' (vLLM's form for --allowed-origins)."""
    text = text.strip()
    if text.startswith("["):
        items = json.loads(text)
        if not isinstance(items, list) or not all(isinstance(x, str) for x in items):
            raise ValueError("expected a JSON list of strings")
        return items
    return [x.strip() for x in text.split(",") if x.strip()]


@dataclasses.dataclass
class ServeConfig:
    """The HTTP side of `ringllm serve`: what the parent process and its API workers need."""

    host: str = setting("127.0.0.1", "address to listen on (0.0.0.0: every interface)")
    port: int = setting(8000, "HTTP port")
    workers: int = setting(1, "API worker processes")
    dp_size: int = setting(
        1,
        "data-parallel engine replicas, each with its own GPUs (tp x pp of them), KV pool "
        "and prefix cache; requests go to the replica whose cache holds their prefix",
        "--data-parallel-size",
        "-dp",
    )
    served_model_name: list[str] | None = setting(
        None,
        "names clients may use for the model, several allowed; the first is reported "
        "(default: the --model argument as given)",
        nargs="+",
        metavar="NAME",
    )
    api_key: str | None = setting(None, "require this bearer token on every route but --public-routes")
    public_routes: str = setting("/health,/metrics", "comma-separated routes that need no API key ('' guards them all)")
    request_timeout: float | None = setting(
        None, "seconds a request may take before it is aborted with 504 (default: no limit)"
    )
    shutdown_timeout: float = setting(30.0, "seconds SIGTERM waits for requests in flight before stopping")
    allowed_origins: list[str] | None = setting(
        None,
        "CORS: origins browsers may call from, comma-separated or a JSON list, '*' for any (default: no CORS headers)",
        parse=comma_list,
        metavar="ORIGINS",
    )
    allowed_hosts: list[str] | None = setting(
        None,
        "Host header values accepted besides localhost names and the --host address (DNS rebinding: a web page "
        "must not drive a local server through a name of its own), comma-separated; '*' accepts any",
        parse=comma_list,
        metavar="HOSTS",
    )
    ssl_keyfile: str | None = setting(None, "TLS private key (PEM); with --ssl-certfile serves HTTPS")
    ssl_certfile: str | None = setting(None, "TLS certificate chain (PEM)")
    tool_call_parser: str | None = setting(
        None,
        "the model's tool-call syntax (hermes: Qwen2.5 and Qwen3; llama3_json: Llama 3.x)",
        choices=(*TOOL_PARSERS, "none"),
        default_text="by family",
    )
    reasoning_parser: str | None = setting(
        None,
        "where the model's reasoning is (qwen3: in a think block the model opens; deepseek_r1: in one the "
        "prompt opens)",
        choices=(*REASONING_PARSERS, "none"),
        default_text="by family",
    )
    chat_template: str | None = setting(
        None,
        "chat template to use instead of the model's: a file, or the template text itself",
        metavar="FILE_OR_TEXT",
        default_text="the model's",
    )
    sanitize_control_tokens: bool = setting(
        False,
        "encode control tokens found in chat messages (the template's role markers) as plain text; by "
        "default they are the real tokens, as in transformers and vLLM",
    )
    root_path: str | None = setting(
        None,
        "serve every route under this path prefix as well (behind a proxy that forwards the prefix)",
        metavar="PATH",
    )
    uds: str | None = setting(
        None, "listen on this Unix domain socket (the file is created) instead of --host and --port", metavar="PATH"
    )
    max_logprobs: int = setting(
        MAX_LOGPROBS,
        f"the most logprobs a request may ask for (logprobs, top_logprobs, prompt_logprobs; more is a 400); "
        f"at most {MAX_LOGPROBS}, what the sampler returns",
    )
    enable_tokenizer_info_endpoint: bool = setting(
        False, "serve GET /tokenizer_info: the tokenizer's configuration, chat template and added tokens"
    )
    enable_server_load_tracking: bool = setting(
        False, "serve GET /load: the requests in flight to the model routes (each API worker counts its own)"
    )
    enable_force_include_usage: bool = setting(
        False, "every stream ends with a usage chunk, as if each request set stream_options.include_usage"
    )
    return_tokens_as_token_ids: bool = setting(
        False, "write every token of logprobs as token_id:<id> (tokens that are not whole UTF-8 survive)"
    )
    skip_tokenizer_init: bool = setting(
        False,
        "serve without the model's tokenizer (a checkpoint may have none): prompts as token ids, answers as token "
        "ids (return_token_ids) with empty text; what needs text (text prompts, chat, stop strings, bad words, "
        "output constraints, /tokenize) is a 400",
    )
    enable_request_id_headers: bool = setting(
        False,
        "every response carries X-Request-Id: the client's (a plain token), else the id made for the request "
        "(without it the ids still name the responses, cmpl-<id>, and the logs)",
    )
    enable_prompt_tokens_details: bool = setting(
        False, "usage reports prompt_tokens_details.cached_tokens: the prompt tokens the prefix cache served"
    )
    generation_config: str = setting(
        "auto",
        "sampling defaults for fields a request leaves unset (vLLM's option): auto takes temperature, top_p, "
        "top_k, min_p, repetition_penalty and max_new_tokens (as max_tokens) from the model's "
        "generation_config.json; vllm: none; or a folder holding a generation_config.json",
        metavar="auto|vllm|FOLDER",
    )


@dataclasses.dataclass
class ServeLimits:
    """What bounds a client's hold on the server (Granian's connection settings, the body-read time the API
    workers enforce), the profiler routes and the engine-stall limit behind /health."""

    http: str = setting(
        "1",
        "HTTP protocols: 1 (HTTP/1.1) or auto (HTTP/1.1 and h2c)",
        choices=("1", "auto"),
    )
    header_read_timeout: float = setting(
        10.0,
        "seconds a connection may take to send a request's headers (or, under --http auto, its first bytes, and "
        "an HTTP/2 client to answer a ping); also how long an idle keep-alive connection stays open (at most 60)",
    )
    body_read_timeout: float = setting(30.0, "seconds a client may take to send a request's body (408 after)")
    backlog: int = setting(1024, "connections the kernel queues for the server before refusing more (at least 128)")
    backpressure: int | None = setting(
        None,
        "requests each API worker serves at once (/health and /metrics take no slot); more wait for one "
        "(default: no limit but --max-connections)",
    )
    max_connections: int = setting(
        8192,
        "connections the server holds open at once, idle ones included; more wait in the backlog (shared by the "
        "API workers; each needs a file descriptor)",
    )
    send_timeout: float = setting(
        30.0,
        "seconds a response may wait for its client to read before the request is cut (a client that stopped reading)",
    )
    profiler_dir: str | None = setting(
        None,
        "enables POST /start_profile and /stop_profile, writing traces here (default: the routes do not exist)",
        metavar="DIR",
    )
    profiler_max_seconds: float = setting(10.0, "a profile started by /start_profile stops itself after this long")
    engine_stall_timeout: float = setting(
        30.0,
        "/health answers 503 once the engine's loop has not turned for this long (hung, stopped or stuck in one step)",
    )


def _base_type(hint) -> type:
    """int for `int | None`, list for `list[int]`, and so on."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    return typing.get_origin(hint) or hint


def _item_type(hint) -> type:
    """The element type of `list[X] | None`."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    args = typing.get_args(hint)
    return args[0] if args else str


def _int_list(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def add_options(parser: argparse.ArgumentParser | Any, cls: type) -> None:
    """One option per field of dataclass `cls` that was declared with `setting`."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        flags = ["--" + f.name.replace("_", "-"), *meta["aliases"]]
        base = _base_type(hints[f.name])
        kw: dict[str, Any] = dict(dest=f.name, help=meta["help"], default=f.default)
        if base is bool:
            kw["action"] = "store_true"
        else:
            if meta["parse"] is not None:
                kw["type"] = meta["parse"]
            elif base is list and meta["nargs"] is None:
                kw["type"] = _int_list if _item_type(hints[f.name]) is int else comma_list
            elif base is list:
                kw["type"] = _item_type(hints[f.name])
            elif base in (int, float):
                kw["type"] = base
            if meta["nargs"]:
                kw["nargs"] = meta["nargs"]
            if meta["choices"]:
                kw["choices"] = meta["choices"]
            if meta["metavar"]:
                kw["metavar"] = meta["metavar"]
        action = parser.add_argument(*flags, **kw)
        setattr(action, "default_text", meta["default_text"])  # noqa: B010 (argparse.Action declares no such field)


def from_args(cls: type, args: argparse.Namespace):
    """The dataclass `cls` with every field that has an option taken from `args`."""
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls) if hasattr(args, f.name)})


def env_name(action: argparse.Action) -> str:
    return ENV_PREFIX + action.dest.upper()


def _env_actions(parser: argparse.ArgumentParser) -> Iterator[tuple[argparse.ArgumentParser, argparse.Action]]:
    """(parser, action) for every option of `parser` and its sub-commands that a variable can set. Options
    marked `no_env` (vLLM's spellings of what another option sets) have none: their variable would be a
    second name for that option's."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _env_actions(sub)
        elif _has_variable(action):
            yield parser, action


def _has_variable(action: argparse.Action) -> bool:
    if not action.option_strings or getattr(action, "no_env", False):
        return False
    return not isinstance(action, (argparse._HelpAction, argparse._VersionAction))


def read_environment(parser: argparse.ArgumentParser, env: Mapping[str, str] = os.environ) -> None:
    """Sets the default of every option of `parser` and its sub-commands from RINGLLM_<DEST> where that is
    set (an empty value counts as unset). A value that does not parse is an error naming the variable."""
    for owner, action in _env_actions(parser):
        name = env_name(action)
        text = env.get(name, "")
        if text == "":
            continue
        try:
            action.default = _from_text(action, text)
        except (ValueError, TypeError, argparse.ArgumentTypeError) as e:
            owner.error(f"{name}={text!r}: {e}")


def option_variables(parser: argparse.ArgumentParser) -> set[str]:
    """Every variable `read_environment` reads for `parser` and its sub-commands."""
    return {env_name(action) for _, action in _env_actions(parser)}


def unknown_variables(parser: argparse.ArgumentParser, env: Mapping[str, str] = os.environ) -> list[str]:
    """The RINGLLM_ variables in `env` that nothing reads, each with the known name it is closest to, if one is
    close ("... (did you mean RINGLLM_PORT?)"). Names starting with an underscore are not in this namespace
    (the launcher's own _RINGLLM_WORKER_SETTINGS)."""
    known = option_variables(parser) | set(OTHER_VARIABLES)
    out = []
    for name in sorted(n for n in env if n.startswith(ENV_PREFIX) and n not in known):
        close = difflib.get_close_matches(name, known, n=1, cutoff=0.85)
        out.append(f"{name} (did you mean {close[0]}?)" if close else name)
    return out


def _from_text(action: argparse.Action, text: str):
    if isinstance(action, argparse._StoreTrueAction):
        if text.lower() not in _TRUE | _FALSE:
            raise ValueError("expected 1/0, true/false, yes/no or on/off")
        return text.lower() in _TRUE
    convert = action.type if callable(action.type) else str  # every typed option here has a callable type
    several = action.nargs == "+" or isinstance(action, argparse._AppendAction)
    values = [convert(x) for x in comma_list(text)] if several else [convert(text)]
    for v in values:
        if action.choices is not None and v not in action.choices:
            raise ValueError(f"{v!r} is not one of {', '.join(map(str, action.choices))}")
    return values if several else values[0]
