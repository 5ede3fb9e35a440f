"""vLLM's command lines: `ringllm serve MODEL` and the flags vLLM users pass, each accepted with its vLLM
meaning, accepted as what ringllm always does, or refused by name."""

import pytest

from ringllm.engine.config import EngineConfig
from ringllm.serve.options import from_args, read_environment
from ringllm.serve.parser import build_parser, subparser
from ringllm.serve.vllm_flags import take_model_argument


def _serve(argv: list[str], env: dict | None = None):
    """`ringllm serve ARGV` parsed as main() parses it."""
    parser = build_parser()
    read_environment(parser, env or {})
    args = parser.parse_args(["serve", *argv])
    take_model_argument(subparser(parser, "serve"), args)
    return args


def test_a_vllm_serve_command_line_is_taken_whole():
    argv = "Qwen/Qwen3-8B --enable-auto-tool-choice --tool-call-parser hermes --enable-prefix-caching "
    argv += "--enable-chunked-prefill --trust-remote-code --disable-log-requests --generation-config auto "
    argv += "--max-model-len 4096 -tp 2 --served-model-name qwen --port 8001"
    args = _serve(argv.split())
    config = from_args(EngineConfig, args)
    assert (config.model, config.context_len, config.tp_size, config.disable_radix_cache) == (
        "Qwen/Qwen3-8B",
        4096,
        2,
        False,
    )
    assert (args.tool_call_parser, args.generation_config, args.served_model_name, args.port) == (
        "hermes",
        "auto",
        ["qwen"],
        8001,
    )


def test_the_positional_model_is_the_model_and_wins_over_the_environment():
    assert _serve(["/models/a"]).model == "/models/a"
    assert _serve(["--port", "1", "/models/a", "--workers", "2"]).model == "/models/a"
    assert _serve(["/models/a"], {"RINGLLM_MODEL": "/models/env"}).model == "/models/a"
    assert _serve([], {"RINGLLM_MODEL": "/models/env"}).model == "/models/env"
    assert _serve(["/models/a", "--model", "/models/a"]).model == "/models/a"


def test_a_positional_model_and_another_model_option_are_refused(capsys):
    with pytest.raises(SystemExit) as e:
        _serve(["/models/a", "--model", "/models/b"])
    assert e.value.code == 2
    assert "the model is given twice: /models/a and --model /models/b" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, env, disabled",
    [
        (["--no-enable-prefix-caching"], {}, True),
        (["--enable-prefix-caching"], {"RINGLLM_DISABLE_RADIX_CACHE": "1"}, False),  # the command line wins
        (["--disable-radix-cache", "--enable-prefix-caching"], {}, False),  # the last one wins
        (["--enable-prefix-caching", "--no-enable-prefix-caching"], {}, True),
        ([], {}, False),
    ],
)
def test_prefix_caching_flags_set_the_radix_cache(argv, env, disabled):
    assert from_args(EngineConfig, _serve(argv, env)).disable_radix_cache is disabled


@pytest.mark.parametrize(
    "flag",
    [
        "--enable-chunked-prefill",
        "--enable-auto-tool-choice",
        "--trust-remote-code",
        "--disable-log-requests",
    ],
)
def test_flags_that_ask_for_what_ringllm_always_does_are_accepted_and_change_nothing(flag):
    assert vars(_serve([flag])) == vars(_serve([]))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--quantization", "awq"], "--quantization awq: ringllm runs no quantized kernels"),
        (["-q", "gptq"], "-q gptq: ringllm runs no quantized kernels"),
        (["--quantization", "fp8"], "--quantization fp8: ringllm runs no quantized kernels"),
        (
            ["--no-enable-chunked-prefill"],
            "--no-enable-chunked-prefill: ringllm always prefills long prompts in chunks",
        ),
    ],
)
def test_flags_ringllm_cannot_honour_are_refused_by_name(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        _serve(argv)
    assert e.value.code == 2 and message in capsys.readouterr().err


def test_generation_config_takes_auto_vllm_or_a_folder_with_auto_the_default():
    assert _serve([]).generation_config == "auto"
    assert _serve(["--generation-config", "vllm"]).generation_config == "vllm"
    assert _serve([], {"RINGLLM_GENERATION_CONFIG": "/cfg"}).generation_config == "/cfg"
