"""The launcher's hand-over to the API workers: one WorkerSettings, built from the options and the engines'
ready messages, in one variable; a worker decodes it once and learns nothing from any other variable."""

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import msgspec
import pytest

from ringllm.app.settings import ENV_VAR, SamplingDefaults, WorkerSettings
from ringllm.serve.cli import worker_settings
from ringllm.serve.host import hand_over
from ringllm.serve.launch import Ready
from ringllm.serve.options import option_variables, read_environment
from ringllm.serve.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]
READY = Ready(pids=[101, 102], model_path="/models/m", max_seq_len=256, vocab_size=1024, kv_slots=512)


def _serve_args(*argv: str):
    parser = build_parser()
    read_environment(parser, {})
    return parser.parse_args(["serve", *argv])


def test_settings_round_trip_through_their_one_variable():
    settings = worker_settings(_serve_args("--api-key", "k"), READY, "{{ x }}", SamplingDefaults(top_k=20))
    env = settings.to_environment()
    assert list(env) == [ENV_VAR] == ["_RINGLLM_WORKER_SETTINGS"]
    assert WorkerSettings.from_environment(env) == settings


def test_a_worker_started_without_the_launcher_is_told_how_to_start():
    with pytest.raises(RuntimeError, match="_RINGLLM_WORKER_SETTINGS is not set: API workers are started by"):
        WorkerSettings.from_environment({})


def test_settings_that_break_their_bounds_do_not_decode():
    text = json.loads(worker_settings(_serve_args(), READY, None, SamplingDefaults()).to_environment()[ENV_VAR])
    with pytest.raises(msgspec.ValidationError, match="body_read_timeout"):
        WorkerSettings.from_environment({ENV_VAR: json.dumps(dict(text, body_read_timeout=0))})


def test_every_option_that_concerns_a_worker_lands_in_its_settings():
    args = _serve_args(
        *("--served-model-name", "a", "b", "--api-key", "k", "--public-routes", "", "--allowed-origins", "http://o"),
        *("--request-timeout", "0", "--body-read-timeout", "5", "--max-waiting-requests", "7", "--workers", "3"),
        *("--engine-stall-timeout", "9", "--profiler-dir", "/p", "--log-level", "debug", "--tokenizer", "/tok"),
        *("--tool-call-parser", "hermes", "--reasoning-parser", "none", "--sanitize-control-tokens"),
    )
    s = worker_settings(args, READY, "{{ t }}", SamplingDefaults(temperature=0.5))
    assert (s.engine_pids, s.kv_slots, s.max_seq_len, s.vocab_size, s.model_path) == (
        [101, 102],
        512,
        256,
        1024,
        "/models/m",
    )
    assert (s.workers, s.served_models, s.served_model, s.tokenizer_path) == (3, ["a", "b"], "a", "/tok")
    assert (s.api_key, s.public_routes, s.allowed_origins) == ("k", [], ["http://o"])
    assert (s.request_timeout, s.body_read_timeout, s.max_waiting_requests, s.engine_stall_timeout) == (None, 5, 7, 9)
    assert (s.profiler_routes, s.log_level, s.chat_template, s.sanitize_control_tokens) == (
        True,
        "debug",
        "{{ t }}",
        True,
    )
    assert (s.tool_call_parser, s.reasoning_parser) == ("hermes", "none")
    assert s.sampling_defaults == SamplingDefaults(temperature=0.5)
    plain = worker_settings(_serve_args(), READY, None, SamplingDefaults())
    assert (plain.api_key, plain.public_routes, plain.allowed_origins, plain.profiler_routes) == (
        None,
        ["/health", "/metrics"],
        [],
        False,
    )
    assert (plain.served_models, plain.tokenizer_path, plain.request_timeout) == (["ringllm-demo"], "/models/m", None)


def test_vllms_server_options_land_in_the_worker_settings():
    args = _serve_args(
        *("--root-path", "/llm", "--max-logprobs", "5", "--enable-tokenizer-info-endpoint"),
        *("--enable-server-load-tracking", "--enable-force-include-usage", "--return-tokens-as-token-ids"),
        *("--scheduling-policy", "priority", "--enable-prompt-tokens-details", "--enable-request-id-headers"),
    )
    s = worker_settings(args, READY, None, SamplingDefaults())
    assert (
        s.enable_prompt_tokens_details
        and not worker_settings(_serve_args(), READY, None, SamplingDefaults()).enable_prompt_tokens_details
    )
    assert (s.root_path, s.max_logprobs, s.tokenizer_info_route, s.server_load_tracking) == ("/llm", 5, True, True)
    assert (s.force_include_usage, s.return_tokens_as_token_ids, s.priority_scheduling) == (True, True, True)
    assert (
        s.request_id_headers and not worker_settings(_serve_args(), READY, None, SamplingDefaults()).request_id_headers
    )
    plain = worker_settings(_serve_args(), READY, None, SamplingDefaults())
    assert (plain.root_path, plain.max_logprobs, plain.tokenizer_info_route, plain.server_load_tracking) == (
        None,
        20,
        False,
        False,
    )
    assert (plain.force_include_usage, plain.return_tokens_as_token_ids, plain.priority_scheduling) == (
        False,
        False,
        False,
    )


def test_max_logprobs_above_what_the_sampler_returns_is_refused_by_name():
    from ringllm.serve.cli import serve_args_problem

    assert serve_args_problem(_serve_args("--max-logprobs", "20")) is None
    for value in ("21", "-1"):
        assert "--max-logprobs" in (serve_args_problem(_serve_args("--max-logprobs", value)) or "")


def test_skip_tokenizer_init_reaches_the_workers_and_refuses_the_options_that_need_a_tokenizer():
    from ringllm.serve.cli import serve_args_problem

    args = _serve_args("--skip-tokenizer-init")
    assert (
        serve_args_problem(args) is None and worker_settings(args, READY, None, SamplingDefaults()).skip_tokenizer_init
    )
    assert not worker_settings(_serve_args(), READY, None, SamplingDefaults()).skip_tokenizer_init
    for given in (("--chat-template", "t.jinja"), ("--tokenizer", "/tok"), ("--enable-tokenizer-info-endpoint",)):
        why = serve_args_problem(_serve_args("--skip-tokenizer-init", *given)) or ""
        assert why.startswith("--skip-tokenizer-init serves without the model's tokenizer") and given[0] in why


def test_uds_makes_granian_bind_a_unix_socket(tmp_path):
    from ringllm.serve.host import granian_options

    sock = tmp_path / "r.sock"
    assert granian_options(_serve_args("--uds", str(sock)))["uds"] == sock
    assert "uds" not in granian_options(_serve_args())


def test_the_workers_inherit_the_settings_and_no_option_variable(monkeypatch):
    for name in [n for n in os.environ if n.startswith("RINGLLM_")]:  # put back afterwards, whatever is removed
        monkeypatch.setenv(name, os.environ[name])
    for name, value in {"RINGLLM_PORT": "9", "RINGLLM_API_KEY": "k", "RINGLLM_CACHE": "/c"}.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv(ENV_VAR, raising=False)
    settings = worker_settings(_serve_args(), READY, None, SamplingDefaults())
    hand_over(settings, option_variables(build_parser()))
    assert "RINGLLM_PORT" not in os.environ and "RINGLLM_API_KEY" not in os.environ
    assert os.environ["RINGLLM_CACHE"] == "/c"  # not an option: the demo model and GGUF tokenizers live there
    assert WorkerSettings.from_environment() == settings
    monkeypatch.delenv(ENV_VAR)


# ---- an API worker with nothing but its settings ----
@pytest.fixture(scope="module")
def engine(demo_path):
    """One engine on the demo model, started as the launcher starts it, for one API worker."""
    from ringllm.engine.config import EngineConfig
    from ringllm.serve.launch import EngineOptions, start_engines

    config = EngineConfig(model=str(demo_path), device="cpu", kv_cache_tokens=1024, context_len=128)
    started = start_engines(config, 1, EngineOptions(1, 5.0, 10.0), threading.Event())
    assert not isinstance(started, int), f"the engine did not start ({started})"
    group, ready = started
    yield ready
    group.stop(30.0)


# Every variable an API worker used to read, and the option variables, set to what a worker must not use.
POISON = {
    "RINGLLM_API_KEY": "poison",
    "RINGLLM_PUBLIC_ROUTES": "/health,/v1/models",
    "RINGLLM_ALLOWED_ORIGINS": "http://poison.test",
    "RINGLLM_PROFILER_ROUTES": "1",
    "RINGLLM_PROFILER_DIR": "/tmp",
    "RINGLLM_SERVED_MODELS": '["poison"]',
    "RINGLLM_SERVED_MODEL_NAME": "poison",
    "RINGLLM_ENGINE_PID": "1",
    "RINGLLM_ENGINE_PIDS": "1,2",
    "RINGLLM_MODEL_PATH": "/nonexistent",
    "RINGLLM_TOKENIZER_PATH": "/nonexistent",
    "RINGLLM_MAX_SEQ_LEN": "2",
    "RINGLLM_CONTEXT_LEN": "2",
    "RINGLLM_BODY_READ_TIMEOUT": "0.000001",
    "RINGLLM_REQUEST_TIMEOUT": "0.000001",
    "RINGLLM_CHAT_TEMPLATE": "{{ raise_exception('poison') }}",
    "RINGLLM_WORKERS": "9",
}

WORKER = """
import json, sys
from litestar.testing import TestClient
from ringllm.app.server import create_app

key = {"Authorization": "Bearer real-key"}
out = {}
worker = create_app()  # as Granian's factory call makes it: no argument
out["defaults"] = worker.app.app.state.settings.sampling_defaults.temperature
with TestClient(app=worker) as c:
    models = c.get("/v1/models", headers=key)
    out["models"] = [m["id"] for m in models.json()["data"]], models.json()["data"][0]["max_model_len"]
    out["poison key"] = c.get("/v1/models", headers={"Authorization": "Bearer poison"}).status_code
    out["health"] = c.get("/health").status_code
    out["profiler"] = c.post("/start_profile", headers=key).status_code
    ask = {"Access-Control-Request-Method": "POST"}
    good = c.options("/v1/completions", headers=dict(ask, Origin="http://settings.test"))
    bad = c.options("/v1/completions", headers=dict(ask, Origin="http://poison.test"))
    out["cors"] = good.headers.get("access-control-allow-origin"), bad.headers.get("access-control-allow-origin")
    done = c.post("/v1/completions", headers=key, json={"prompt": "hi", "max_tokens": 2})
    out["completion"] = done.status_code, done.json().get("usage", {}).get("completion_tokens")
    chat = c.post("/v1/chat/completions", headers=key, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 1})
    out["chat"] = chat.status_code
print(json.dumps(out))
"""


def test_an_api_worker_takes_everything_from_its_settings_and_nothing_from_other_variables(engine, tmp_path):
    settings = WorkerSettings(
        engine_pids=engine.pids,
        workers=1,
        kv_slots=engine.kv_slots,
        max_seq_len=engine.max_seq_len,
        vocab_size=engine.vocab_size,
        model_path=engine.model_path,
        served_models=["from-settings"],
        tokenizer_path=engine.model_path,
        api_key="real-key",
        public_routes=["/health"],
        allowed_origins=["http://settings.test"],
        allowed_hosts=["testserver.local"],  # Litestar's TestClient's Host
        sampling_defaults=SamplingDefaults(temperature=0.5),
    )
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    env.update(POISON, RINGLLM_CACHE=str(tmp_path), **settings.to_environment())
    run = subprocess.run([sys.executable, "-c", WORKER], capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    out = json.loads(run.stdout.strip().splitlines()[-1])
    assert out["models"] == [["from-settings"], engine.max_seq_len]
    assert (out["poison key"], out["health"], out["profiler"]) == (401, 200, 404)
    assert out["cors"] == ["http://settings.test", None]
    assert out["completion"] == [200, 2] and out["chat"] == 200
    assert out["defaults"] == 0.5
