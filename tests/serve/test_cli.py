"""The `ringllm` command without a server: --version, start-up errors that stop it before anything runs, the
health command with nothing to ask, and a serve parent whose imports leave torch out (moved from
tests/e2e/test_operator.py and tests/e2e/test_data_parallel.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _ringllm(*argv: str, cache: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, RINGLLM_CACHE=str(cache))
    return subprocess.run(
        [sys.executable, "-m", "ringllm", *argv], capture_output=True, text=True, timeout=300, env=env, cwd=ROOT
    )


def test_version():
    run = subprocess.run([sys.executable, "-m", "ringllm", "--version"], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0 and run.stdout.startswith("ringllm 0.")


def test_kv_cache_dtype_not_implemented_is_refused_clearly(tmp_path):
    run = _ringllm("generate", "hi", "--kv-cache-dtype", "fp8_e5m2", cache=tmp_path)  # vLLM has it, we do not
    assert run.returncode == 2, run.stderr
    assert "--kv-cache-dtype: invalid choice: 'fp8_e5m2' (choose from 'auto', 'fp8', 'fp8_e4m3')" in run.stderr


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_device_cuda_without_cuda_is_a_clear_error(tmp_path):
    run = _ringllm("generate", "hi", "--device", "cuda", "--max-tokens", "1", cache=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "error: --device cuda: this torch" in run.stderr and "Traceback" not in run.stderr


def test_context_len_beyond_the_models_maximum_is_refused(tmp_path):
    run = _ringllm("generate", "hi", "--device", "cpu", "--max-model-len", "5000", cache=tmp_path)
    assert run.returncode == 2, run.stderr
    assert "--context-len 5000 is larger than the model's maximum of 4096" in run.stderr


def test_half_a_tls_pair_is_refused_before_anything_starts(tmp_path):
    run = _ringllm("serve", "--ssl-certfile", str(tmp_path / "cert.pem"), cache=tmp_path)
    assert run.returncode == 2 and "--ssl-keyfile and --ssl-certfile go together" in run.stderr


def test_dp_size_must_be_positive(tmp_path):
    run = _ringllm("serve", "--device", "cpu", "--dp-size", "0", cache=tmp_path)
    assert run.returncode == 2 and "--dp-size must be >= 1" in run.stderr


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--workers", "0"], "--workers must be >= 1, got 0"),
        (["--body-read-timeout", "0"], "--body-read-timeout must be > 0, got 0.0"),
        (["--engine-stall-timeout", "-1"], "--engine-stall-timeout must be > 0, got -1.0"),
        (["--max-waiting-requests", "0"], "--max-waiting-requests must be > 0, got 0"),
        (["--request-timeout", "-5"], "--request-timeout must be >= 0 (0: no limit), got -5.0"),
    ],
)
def test_settings_an_api_worker_could_not_take_are_refused_before_anything_starts(tmp_path, argv, message):
    """Each would otherwise reach the API workers' settings and stop every worker as it decodes them."""
    run = _ringllm("serve", "--device", "cpu", *argv, cache=tmp_path)
    assert run.returncode == 2 and f"error: {message}" in run.stderr, run.stderr
    assert "engine ready" not in run.stderr


def test_health_command_fails_without_a_server(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "ringllm", "health", "--pid", str(os.getpid()), "--timeout", "1"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 1 and "unhealthy" in run.stdout


def test_what_the_serve_parent_imports_leaves_torch_out():
    """The parent's own imports before Granian forks (tests/e2e/test_operator.py reads the API workers' memory
    maps for the result, this names the modules): the launcher, what each API worker loads (app.server), and
    what the launcher reaches for while it runs."""
    code = (
        "import sys, ringllm.serve.cli, ringllm.serve.host, ringllm.serve.launch, ringllm.serve.health_check, "
        "ringllm.serve.generation_config, ringllm.app.server, ringllm.engine.logs, ringllm.ipc.lifecycle, granian; "
        "sys.exit('torch' in sys.modules)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert run.returncode == 0, run.stderr


def test_a_generation_config_folder_without_the_file_is_refused_before_the_engine_loads(tmp_path):
    run = _ringllm("serve", "--device", "cpu", "--generation-config", str(tmp_path / "none"), cache=tmp_path)
    assert run.returncode == 2 and f"--generation-config {tmp_path / 'none'}: no generation_config.json" in run.stderr
    assert "engine ready" not in run.stderr


def test_a_models_generation_config_no_request_could_carry_stops_the_start_and_the_engine(tmp_path):
    """Read once the engine has found the model (a hub id is resolved then): the engine it started is stopped."""
    import json

    from ringllm.engine.demo import demo_model_path
    from tests.helpers import free_port

    model = demo_model_path(tmp_path)
    (model / "generation_config.json").write_text(json.dumps({"temperature": 5.0}))
    argv = ("serve", str(model), "--device", "cpu", "--kv-cache-tokens", "512", "--context-len", "64")
    run = _ringllm(*argv, "--port", str(free_port()), cache=tmp_path)
    assert run.returncode == 2, run.stderr[-3000:]
    assert f"error: {model}/generation_config.json: temperature must be a number in [0, 2], got 5.0" in run.stderr
    assert "engine ready" in run.stderr and "Traceback" not in run.stderr
