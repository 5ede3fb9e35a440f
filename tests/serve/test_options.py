"""Options generated from the config fields, their RINGLLM_ variables, and the warning that names a RINGLLM_
variable no option has (moved from tests/e2e/test_operator.py, which keeps the whole-server checks)."""

import dataclasses
import re
import subprocess
import sys
from pathlib import Path

import pytest

from ringllm.engine.config import EngineConfig
from ringllm.serve.options import OTHER_VARIABLES, ServeConfig, from_args, option_variables, read_environment
from ringllm.serve.options import unknown_variables as unknown
from ringllm.serve.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]


def _parse(argv: list[str], env: dict | None = None):
    parser = build_parser()
    read_environment(parser, env or {})
    return parser.parse_args(argv)


# ---- options generated from the config fields ----
def test_every_config_field_has_an_option_with_its_default():
    args = _parse(["serve"])
    for cls in (EngineConfig, ServeConfig):
        for f in dataclasses.fields(cls):
            assert getattr(args, f.name) == f.default, f.name
    assert from_args(EngineConfig, args) == EngineConfig()


@pytest.mark.parametrize(
    "argv, field, value",
    [
        (["--max-model-len", "512"], "context_len", 512),
        (["--tensor-parallel-size", "2"], "tp_size", 2),
        (["-tp", "2"], "tp_size", 2),
        (["--pipeline-parallel-size", "3"], "pp_size", 3),
        (["-pp", "3"], "pp_size", 3),
        (["--max-num-seqs", "17"], "max_bs", 17),
        (["--tokenizer", "/tok"], "tokenizer", "/tok"),
        (["--download-dir", "/dl"], "download_dir", "/dl"),
        (["--kv-cache-dtype", "auto"], "kv_cache_dtype", "auto"),
        (["--kv-cache-dtype", "fp8"], "kv_cache_dtype", "fp8"),
        (["--master-port", "30001"], "nccl_port", 30001),
        (["--device-ids", "2,3"], "device_ids", [2, 3]),
        (["--enable-deterministic-inference"], "enable_deterministic_inference", True),
        (["--deterministic"], "enable_deterministic_inference", True),
    ],
)
def test_vllm_names_set_the_same_engine_field(argv, field, value):
    assert getattr(from_args(EngineConfig, _parse(["serve", *argv])), field) == value


def test_served_model_name_takes_several_and_origins_take_json_or_commas():
    args = _parse(["serve", "--served-model-name", "Qwen/Qwen3-8B", "qwen", "--allowed-origins", '["http://a"]'])
    assert args.served_model_name == ["Qwen/Qwen3-8B", "qwen"] and args.allowed_origins == ["http://a"]
    args = _parse(["serve", "--allowed-origins", "http://a, http://b", "--ssl-keyfile", "k", "--ssl-certfile", "c"])
    assert args.allowed_origins == ["http://a", "http://b"] and (args.ssl_keyfile, args.ssl_certfile) == ("k", "c")


def test_every_option_reads_its_environment_variable_and_the_command_line_wins():
    env = {
        "RINGLLM_PORT": "9123",
        "RINGLLM_CONTEXT_LEN": "300",
        "RINGLLM_ENFORCE_EAGER": "true",
        "RINGLLM_SERVED_MODEL_NAME": "a,b",
        "RINGLLM_DEVICE_IDS": "0,1",
        "RINGLLM_SHUTDOWN_TIMEOUT": "45",
        "RINGLLM_API_KEY": "k",
        "RINGLLM_DISABLE_RADIX_CACHE": "0",
        "RINGLLM_DTYPE": "",
    }
    args = _parse(["serve"], env)
    assert (args.port, args.context_len, args.enforce_eager, args.served_model_name) == (9123, 300, True, ["a", "b"])
    assert (args.device_ids, args.shutdown_timeout, args.api_key) == ([0, 1], 45.0, "k")
    assert args.disable_radix_cache is False and args.dtype == "auto"  # "" counts as unset
    assert _parse(["serve", "--max-model-len", "200", "--port", "1"], env).context_len == 200


@pytest.mark.parametrize(
    "env", [{"RINGLLM_PORT": "eighty"}, {"RINGLLM_ENFORCE_EAGER": "maybe"}, {"RINGLLM_DEVICE": "tpu"}]
)
def test_an_environment_value_that_does_not_parse_names_the_variable(env, capsys):
    with pytest.raises(SystemExit) as e:
        _parse(["serve"], env)
    assert e.value.code == 2 and next(iter(env)) in capsys.readouterr().err


# ---- RINGLLM_ variables that nothing reads ----
def test_unknown_variables_are_named_with_the_option_they_were_likely_meant_for():
    env = {
        "RINGLLM_PORTT": "1",  # misspelt
        "RINGLLM_CONTEXT_LENGTH": "2048",  # a near miss
        "RINGLLM_SOMETHING": "x",  # nothing near
        "RINGLLM_PORT": "8001",  # an option's
        "RINGLLM_CACHE": "/c",  # documented, not an option
        "_RINGLLM_WORKER_SETTINGS": "{}",  # the launcher's own, outside the namespace
        "OTHER": "1",
    }
    assert unknown(build_parser(), env) == [
        "RINGLLM_CONTEXT_LENGTH (did you mean RINGLLM_CONTEXT_LEN?)",
        "RINGLLM_PORTT (did you mean RINGLLM_PORT?)",
        "RINGLLM_SOMETHING",
    ]


def test_every_option_of_every_command_has_a_known_variable_and_vllm_flags_have_none():
    names = option_variables(build_parser())
    assert {"RINGLLM_PORT", "RINGLLM_MODEL", "RINGLLM_GENERATION_CONFIG", "RINGLLM_MAX_TOKENS"} <= names
    assert not names & {"RINGLLM_ENABLE_PREFIX_CACHING", "RINGLLM_QUANTIZATION", "RINGLLM_TRUST_REMOTE_CODE"}
    assert not names & set(OTHER_VARIABLES)


def test_every_ringllm_variable_the_project_names_is_known():
    """Each RINGLLM_ name in the code, scripts, docs and other tests is an option's or one of OTHER_VARIABLES,
    so the warning never names a variable the project itself reads (this folder's tests misspell on purpose)."""
    known = option_variables(build_parser()) | set(OTHER_VARIABLES)
    here = Path(__file__).parent
    paths = [*ROOT.glob("ringllm/**/*.py"), *ROOT.glob("scripts/*"), *ROOT.glob("docs/*.md")]
    paths += [
        ROOT / "README.md",
        ROOT / "Containerfile",
        *(p for p in ROOT.glob("tests/**/*.py") if here not in p.parents),
    ]
    named = {
        (name, path.relative_to(ROOT).as_posix())
        for path in paths
        if path.is_file()
        for name in re.findall(r"(?<![A-Za-z0-9_])RINGLLM_[A-Z0-9_]*[A-Z0-9]", path.read_text(errors="replace"))
    }
    assert len(named) > 40
    assert not {(name, path) for name, path in named if name not in known}


def test_serve_warns_at_start_naming_unknown_variables(tmp_path):
    """Before anything starts: here `--dp-size 0` then stops the start with its own error."""
    env = {"PATH": "/usr/bin:/bin", "RINGLLM_CACHE": str(tmp_path), "RINGLLM_PORTT": "9000", "RINGLLM_WORKERS": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "ringllm", "serve", "--dp-size", "0"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert run.returncode == 2 and "--dp-size must be >= 1" in run.stderr
    assert "RINGLLM_PORTT (did you mean RINGLLM_PORT?)" in run.stderr and "RINGLLM_WORKERS" not in run.stderr
