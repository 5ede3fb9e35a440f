"""Schemathesis drives every route of the server's OpenAPI document with generated bodies: no 5xx, and the
server is whole afterwards (no KV slot held)."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.helpers import (
    start_server,
    stop_server,
    wait_for_metric,
)

SLOTS = "ringllm_kv_cache_slots_used_by_requests"


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory):
    cache = tmp_path_factory.mktemp("fuzz")
    proc, base = start_server(
        cache,
        "--kv-cache-tokens",
        "16384",
        "--context-len",
        "64",
        "--max-bs",
        "64",
        "--profile-dir",
        str(cache / "profiles"),
    )
    yield base
    stop_server(proc)


@pytest.mark.skipif(
    shutil.which("schemathesis", path=os.path.dirname(sys.executable)) is None, reason="schemathesis is not installed"
)
def test_schemathesis_finds_no_server_error(fuzz_server, tmp_path):
    """Schemathesis drives every route of the app's own OpenAPI document with valid and invalid bodies."""
    exe = os.path.join(os.path.dirname(sys.executable), "schemathesis")
    cmd = [
        exe,
        "run",
        fuzz_server + "/schema/openapi.json",
        "--checks",
        "not_a_server_error",
        "--max-examples",
        "25",
        "--seed",
        "7",
        "--workers",
        "2",
        "--request-timeout",
        "30",
        "--exclude-path-regex",
        "profile",
        "--generation-database",
        "none",
        "--no-color",
        "--report-dir",
        str(tmp_path),
    ]
    env = dict(
        os.environ,
        SCHEMATHESIS_HOOKS="tests.e2e.schemathesis_hooks",
        PYTHONPATH=str(Path(__file__).resolve().parents[2]),
    )
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=400, env=env, cwd=tmp_path)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "passed" in run.stdout.lower(), run.stdout[-2000:]
    print(run.stdout[-1500:])
    assert httpx.get(fuzz_server + "/health").status_code == 200
    assert wait_for_metric(fuzz_server, SLOTS, 0, 30) == 0
