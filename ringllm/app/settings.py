"""What an API worker needs to know, in one typed struct: built by `ringllm serve` (the launcher) from its
options and the engines' ready messages, handed to the Granian workers in one environment variable, and decoded
once, checked, as a worker starts. No other setting crosses that process boundary.

The variable's name is outside the RINGLLM_<OPTION> namespace on purpose: those are the user's option
variables, and a warning names any RINGLLM_ variable that is not one of them."""

from __future__ import annotations

import os
from typing import Annotated

import msgspec
from msgspec import Meta

ENV_VAR = "_RINGLLM_WORKER_SETTINGS"

Positive = Annotated[float, Meta(gt=0)]


class SamplingDefaults(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """Values for the sampling fields a request leaves unset, where the model's creators recommend some: its
    generation_config.json, read by the launcher (vLLM's `--generation-config auto`; `vllm` leaves every field
    None). max_tokens is generation_config's max_new_tokens. The launcher checks each against the bounds
    ipc/sampling.py declares for the field."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    max_tokens: int | None = None


class WorkerSettings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One API worker's settings. Engine facts (pids, capacity, context, vocabulary) come from the engines'
    ready messages; the rest from `ringllm serve`'s options."""

    # ---- the engines ----
    engine_pids: Annotated[list[int], Meta(min_length=1)]  # one per --dp-size replica; replica 0 first
    workers: Annotated[int, Meta(ge=1)]  # API worker processes: each claims one ring pair per engine
    kv_slots: Annotated[int, Meta(ge=0)] = 0  # the smallest replica's KV capacity in tokens (the router's bound)
    max_seq_len: Annotated[int, Meta(ge=1)]
    vocab_size: Annotated[int, Meta(ge=0)] = 0  # the model's; its tokenizer may know fewer ids
    # ---- the model as clients see it ----
    model_path: str
    served_models: Annotated[list[str], Meta(min_length=1)]  # names clients may use; answers report the first
    tokenizer_path: str
    chat_template: str | None = None  # the template's text (--chat-template, read by the launcher), or the model's
    skip_tokenizer_init: bool = False  # --skip-tokenizer-init: no tokenizer in the workers, token ids in and out
    sanitize_control_tokens: bool = False
    tool_call_parser: str | None = None
    reasoning_parser: str | None = None
    # vLLM's --enable-prompt-tokens-details: usage.prompt_tokens_details.cached_tokens (the prefix-cache hit)
    enable_prompt_tokens_details: bool = False
    # ---- HTTP ----
    api_key: str | None = None
    public_routes: list[str] = msgspec.field(default_factory=lambda: ["/health", "/metrics"])
    allowed_origins: list[str] = []  # CORS; empty: no CORS headers
    request_timeout: Positive | None = None
    body_read_timeout: Positive = 30.0
    # A request's generations (prompts × n) wait in the engine's queue together: more can never be queued.
    max_waiting_requests: Annotated[int, Meta(ge=1)] = 4096
    engine_stall_timeout: Positive = 30.0
    profiler_routes: bool = False
    log_level: str = "info"
    root_path: str | None = None  # --root-path: every route is served under this prefix too
    server_load_tracking: bool = False  # --enable-server-load-tracking: GET /load
    tokenizer_info_route: bool = False  # --enable-tokenizer-info-endpoint: GET /tokenizer_info
    request_id_headers: bool = False  # --enable-request-id-headers: X-Request-Id on every response
    # ---- hostile clients (app/limits.py, app/guard.py) ----
    send_timeout: Positive = 30.0  # a response write that waits longer for the client to read cuts the request
    request_slots: Annotated[int, Meta(ge=1)] | None = None  # --backpressure: requests at once, probes aside
    allowed_hosts: list[str] = []  # Host names taken besides localhost names and IP addresses; "*": any
    # ---- requests ----
    sampling_defaults: SamplingDefaults = msgspec.field(default_factory=SamplingDefaults)
    max_logprobs: Annotated[int, Meta(ge=0)] = 20  # --max-logprobs: the most top logprobs a request may ask for
    force_include_usage: bool = False  # --enable-force-include-usage: every stream ends with its usage chunk
    return_tokens_as_token_ids: bool = False  # --return-tokens-as-token-ids: logprob tokens written token_id:<id>
    priority_scheduling: bool = False  # --scheduling-policy priority: requests may carry a non-zero priority

    @property
    def served_model(self) -> str:
        return self.served_models[0]

    def to_environment(self) -> dict[str, str]:
        """The variable the launcher sets before Granian forks its workers."""
        return {ENV_VAR: msgspec.json.encode(self).decode()}

    @classmethod
    def from_environment(cls, env=os.environ) -> WorkerSettings:
        """Decodes the launcher's settings (msgspec checks every field); a worker started any other way is told
        how it should have been started."""
        text = env.get(ENV_VAR)
        if not text:
            raise RuntimeError(f"{ENV_VAR} is not set: API workers are started by `ringllm serve`")
        return msgspec.json.decode(text, type=cls)
