"""--generation-config: the sampling defaults of a model's generation_config.json, taken as vLLM takes them,
checked against the request bounds, and handed to the API workers in their settings."""

import json
from pathlib import Path

import pytest

from ringllm.app.settings import SamplingDefaults, WorkerSettings
from ringllm.serve.generation_config import GenerationConfigError, folder_problem, sampling_defaults
from ringllm.serve.launch import Ready
from ringllm.serve.options import read_environment
from ringllm.serve.parser import build_parser

QWEN = {  # Qwen2.5-Coder-0.5B-Instruct's generation_config.json
    "bos_token_id": 151643,
    "pad_token_id": 151643,
    "do_sample": True,
    "eos_token_id": [151645, 151643],
    "repetition_penalty": 1.1,
    "temperature": 0.7,
    "top_p": 0.8,
    "top_k": 20,
    "transformers_version": "4.37.0",
}


def _folder(tmp_path: Path, config: dict, name: str = "model") -> Path:
    folder = tmp_path / name
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(config))
    return folder


def test_auto_takes_the_models_sampling_fields_and_max_new_tokens_as_max_tokens(tmp_path):
    model = _folder(tmp_path, dict(QWEN, min_p=0.05, max_new_tokens=512))
    defaults, source = sampling_defaults("auto", str(model))
    assert defaults == SamplingDefaults(
        temperature=0.7, top_p=0.8, top_k=20, min_p=0.05, repetition_penalty=1.1, max_tokens=512
    )
    assert source == f"sampling defaults from {model}/generation_config.json (--generation-config vllm to ignore them)"


def test_values_equal_to_transformers_defaults_are_left_unset_as_vllm_does(tmp_path):
    model = _folder(tmp_path, {"temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0})
    defaults, source = sampling_defaults("auto", str(model))
    assert defaults == SamplingDefaults() and source.startswith("no sampling defaults in ")
    only_top_k = _folder(tmp_path, {"top_k": 40, "temperature": 1.0}, "other")
    assert sampling_defaults("auto", str(only_top_k))[0] == SamplingDefaults(top_k=40)


def test_vllm_takes_none_and_a_folder_takes_its_own_file(tmp_path):
    model = _folder(tmp_path, QWEN)
    assert sampling_defaults("vllm", str(model)) == (
        SamplingDefaults(),
        "no sampling defaults (--generation-config vllm)",
    )
    elsewhere = _folder(tmp_path, {"temperature": 0.3}, "elsewhere")
    assert sampling_defaults(str(elsewhere), str(model))[0] == SamplingDefaults(temperature=0.3)


def test_a_gguf_file_or_a_folder_without_the_file_has_no_defaults_and_says_so(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF")
    assert sampling_defaults("auto", str(gguf)) == (
        SamplingDefaults(),
        "no sampling defaults: a GGUF file has no generation_config.json (model.gguf)",
    )
    assert sampling_defaults("auto", str(tmp_path)) == (
        SamplingDefaults(),
        f"no sampling defaults: {tmp_path} has no generation_config.json",
    )


def test_a_folder_without_the_file_is_refused_before_the_engine_starts(tmp_path):
    assert folder_problem("auto") is None and folder_problem("vllm") is None
    assert folder_problem(str(_folder(tmp_path, QWEN))) is None
    assert folder_problem(str(tmp_path / "none")) == (
        f"--generation-config {tmp_path / 'none'}: no generation_config.json there (auto: the model's; vllm: no defaults)"
    )


@pytest.mark.parametrize(
    "config, message",
    [
        ({"temperature": 3.0}, "temperature must be a number in [0, 2], got 3.0"),
        ({"top_p": 0.0}, "top_p must be a number in (0, 1], got 0.0"),
        ({"max_new_tokens": 0}, "max_tokens must be an integer >= 1, got 0"),
        ({"repetition_penalty": 0.0}, "repetition_penalty must be a number in [0.01, 2], got 0.0"),
        ({"temperature": "warm"}, "Expected `float | null`, got `str` - at `$.temperature`"),
        ({"top_k": 2.5}, "Expected `int | null`, got `float` - at `$.top_k`"),
    ],
)
def test_a_value_no_request_could_carry_is_refused_naming_the_file_and_field(tmp_path, config, message):
    model = _folder(tmp_path, config)
    with pytest.raises(GenerationConfigError) as e:
        sampling_defaults("auto", str(model))
    assert str(e.value) == f"{model}/generation_config.json: {message}"


def test_a_file_that_is_not_json_is_refused_naming_it(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text("{not json")
    with pytest.raises(GenerationConfigError, match="generation_config.json: Expecting property name"):
        sampling_defaults("auto", str(model))


def test_the_defaults_reach_the_api_workers_settings(tmp_path):
    from ringllm.serve.cli import worker_settings

    parser = build_parser()
    read_environment(parser, {})
    args = parser.parse_args(["serve"])
    defaults, _ = sampling_defaults("auto", str(_folder(tmp_path, QWEN)))
    ready = Ready(pids=[4242], model_path=str(tmp_path / "model"), max_seq_len=256, vocab_size=1024, kv_slots=512)
    settings = worker_settings(args, ready, None, defaults)
    decoded = WorkerSettings.from_environment(settings.to_environment())
    assert decoded.sampling_defaults == SamplingDefaults(temperature=0.7, top_p=0.8, top_k=20, repetition_penalty=1.1)
