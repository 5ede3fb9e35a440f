"""What an operator who runs vLLM today meets first, against a running server: RINGLLM_* environment
variables reaching it, request ids, access logs, CORS, TLS, metrics, and a serve parent that keeps torch out of
the API workers. The command line on its own (options, variables, vLLM's flags, start-up errors) is tested in
tests/serve/."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


# ---- one server for the HTTP checks ----
@pytest.fixture(scope="module")
def served(tmp_path_factory):
    from tests.helpers import start_server, stop_server

    cache = tmp_path_factory.mktemp("operator")
    env = {"RINGLLM_KV_CACHE_TOKENS": "4096", "RINGLLM_CONTEXT_LEN": "256", "RINGLLM_ALLOWED_ORIGINS": "http://ok.test"}
    names = ("--served-model-name", "Org/Model-8B", "model-8b")
    # --enable-request-id-headers: the request-id tests read the X-Request-Id response header (vLLM's option)
    proc, base = start_server(cache, "--workers", "2", *names, "--enable-request-id-headers", env=env)
    _wait_for_workers(cache / "serve.log", 2)
    yield proc, base, cache
    stop_server(proc)


def _wait_for_workers(log: Path, n: int) -> None:
    """Until n API workers said they are ready. /health answers once the first one is: a SIGTERM while the
    other is still starting leaves it hanging (a start-up race in the serve parent, not checked here)."""
    import time

    deadline = time.monotonic() + 120
    while log.read_text().count('"app worker ready"') < n:
        assert time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.2)


def test_neither_the_serve_parent_nor_its_api_workers_map_libtorch(served):
    proc, _, _ = served
    from tests.helpers import api_workers

    workers = api_workers(proc.pid)
    assert len(workers) == 2
    for pid in [proc.pid, *workers]:
        assert "libtorch" not in Path(f"/proc/{pid}/maps").read_text(), pid


def test_environment_variables_reach_the_server(served):
    _, _, cache = served
    assert "KV capacity 4096 tokens" in (cache / "serve.log").read_text()  # from RINGLLM_KV_CACHE_TOKENS


def test_health_command_finds_the_servers_port_from_its_own_options(served):
    """The container's HEALTHCHECK: `ringllm health` reads the server's command line and environment, so it
    follows --port (given here on the command line by the test helper) and answers 0 while /health is 200."""
    proc, _, _ = served
    run = subprocess.run(
        [sys.executable, "-m", "ringllm", "health", "--pid", str(proc.pid)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and run.stdout.strip() == "healthy", run.stdout + run.stderr


# ---- request ids and the access log ----
def _log_lines(cache: Path) -> list[dict]:
    import json

    out = []
    for line in (cache / "serve.log").read_text().splitlines():
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def _wait_for_log(cache: Path, pred, what: str) -> dict:
    """The first JSON log line that satisfies pred; lines from the API workers arrive as they write them."""
    import time

    for _ in range(100):
        found = [x for x in _log_lines(cache) if pred(x)]
        if found:
            return found[0]
        time.sleep(0.1)
    raise AssertionError(f"no log line for {what}")


def test_an_incoming_request_id_is_returned_used_in_the_response_id_and_logged(served):
    import httpx

    _, base, cache = served
    r = httpx.post(
        base + "/v1/completions",
        headers={"X-Request-Id": "op-test-1"},
        timeout=30,
        json={"model": "model-8b", "prompt": "hi", "max_tokens": 2},
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == "op-test-1"
    assert r.json()["id"] == "cmpl-op-test-1" and r.json()["model"] == "Org/Model-8B"
    c = httpx.post(
        base + "/v1/chat/completions",
        headers={"X-Request-Id": "op-test-2"},
        timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
    )
    assert c.headers["x-request-id"] == "op-test-2" and c.json()["id"] == "chatcmpl-op-test-2"
    with httpx.stream(
        "POST",
        base + "/v1/chat/completions",
        headers={"X-Request-Id": "op-test-3"},
        timeout=30,
        json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, "stream": True},
    ) as s:
        assert s.headers["x-request-id"] == "op-test-3"
        assert '"id":"chatcmpl-op-test-3"' in s.read().decode()
    for rid in ("op-test-1", "op-test-2", "op-test-3"):
        access = _wait_for_log(cache, lambda x, rid=rid: x.get("event") == "access" and x.get("request_id") == rid, rid)
        assert access["status"] == 200 and access["method"] == "POST"
        done = _wait_for_log(cache, lambda x, rid=rid: x.get("event") == "request" and x.get("request_id") == rid, rid)
        assert done["completion_tokens"] == 2


def test_a_request_id_is_made_when_none_or_a_bad_one_is_given(served):
    import httpx

    _, base, _ = served
    for headers in ({}, {"X-Request-Id": "bad id with spaces"}, {"X-Request-Id": "x" * 300}):
        r = httpx.post(base + "/v1/completions", headers=headers, json={"prompt": "hi", "max_tokens": 1}, timeout=30)
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and int(rid, 16) >= 0 and r.json()["id"] == f"cmpl-{rid}"


@pytest.mark.parametrize(
    "method, path, body, status",
    [
        ("POST", "/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400),
        ("POST", "/v1/completions", {"model": "other", "prompt": "hi"}, 404),
        ("GET", "/no/such/route", None, 404),
    ],
)
def test_answers_with_errors_get_one_access_line_with_their_status_and_id(served, method, path, body, status):
    import httpx

    _, base, cache = served
    rid = f"err-{status}-{len(path)}-{method}"
    r = httpx.request(method, base + path, json=body, headers={"X-Request-Id": rid}, timeout=30)
    assert r.status_code == status and r.headers["x-request-id"] == rid
    _wait_for_log(cache, lambda x: x.get("request_id") == rid and x.get("event") == "access", rid)
    lines = [x for x in _log_lines(cache) if x.get("request_id") == rid and x.get("event") == "access"]
    assert len(lines) == 1 and lines[0]["status"] == status and lines[0]["path"] == path


def test_served_model_aliases_are_listed_and_each_is_accepted(served):
    import httpx

    _, base, _ = served
    models = httpx.get(base + "/v1/models", timeout=10).json()["data"]
    assert [m["id"] for m in models] == ["Org/Model-8B", "model-8b"]
    for name in ("Org/Model-8B", "model-8b"):
        r = httpx.post(base + "/v1/completions", json={"model": name, "prompt": "hi", "max_tokens": 1}, timeout=30)
        assert r.status_code == 200 and r.json()["model"] == "Org/Model-8B"


def test_granian_logs_through_the_json_logger_and_the_ready_line_follows_the_listener(served):
    """A JSON log is JSON throughout: Granian's lines, and the demo note and ready line as events with their
    facts as fields. The ready line is written once Granian listens and before any API worker starts, so
    nobody has had an answer from /health before it is there."""
    import json

    _, base, cache = served
    text = (cache / "serve.log").read_text().splitlines()
    assert [line for line in text if not line.startswith("{")] == []
    events = [json.loads(line) for line in text]
    note = next(i for i, e in enumerate(events) if e["event"].startswith("note: no --model"))
    ready = next(i for i, e in enumerate(events) if e["event"].startswith("ringllm ready on " + base))
    assert events[note]["model"] == "demo"
    facts = {k: events[ready][k] for k in ("url", "model", "tp", "pp", "kv_capacity_tokens", "dp")}
    assert facts == dict(url=base, model="Org/Model-8B", tp=1, pp=1, kv_capacity_tokens=4096, dp=1)
    listening = next(i for i, e in enumerate(events) if e.get("logger") == "_granian" and "Listening at" in e["event"])
    workers = [i for i, e in enumerate(events) if e["event"] == "app worker ready"]
    first_access = next(i for i, e in enumerate(events) if e["event"] == "access")
    assert listening < ready < min(workers) and ready < first_access


# ---- CORS ----
def test_cors_preflight_from_an_allowed_origin_gets_the_access_control_headers(served):
    import httpx

    _, base, _ = served
    r = httpx.options(
        base + "/v1/chat/completions",
        timeout=10,
        headers={
            "Origin": "http://ok.test",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
    )
    assert r.status_code in (200, 204), r.text
    assert r.headers["access-control-allow-origin"] == "http://ok.test"
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    post = httpx.post(
        base + "/v1/completions",
        json={"prompt": "hi", "max_tokens": 1},
        timeout=30,
        headers={"Origin": "http://ok.test"},
    )
    assert post.headers["access-control-allow-origin"] == "http://ok.test"
    assert "x-request-id" in post.headers["access-control-expose-headers"].lower()


def test_cors_gives_nothing_to_other_origins(served):
    import httpx

    _, base, _ = served
    r = httpx.options(
        base + "/v1/completions",
        timeout=10,
        headers={"Origin": "http://evil.test", "Access-Control-Request-Method": "POST"},
    )
    assert "access-control-allow-origin" not in r.headers
    post = httpx.post(
        base + "/v1/completions",
        json={"prompt": "hi", "max_tokens": 1},
        timeout=30,
        headers={"Origin": "http://evil.test"},
    )
    assert "access-control-allow-origin" not in post.headers


# ---- TLS, and the default served name ----
def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A key and a certificate for 127.0.0.1, made here with `cryptography`."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_file, cert_file = folder / "key.pem", folder / "cert.pem"
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_file, cert_file


def test_tls_on_loopback_and_the_model_argument_as_the_served_name(tmp_path):
    """Also a vLLM command line: the model as the positional argument, vLLM's flags, and the sampling defaults
    of the model's generation_config.json (--generation-config auto) logged at start."""
    import json
    import signal
    import time

    import httpx

    from ringllm.engine.demo import demo_model_path
    from tests.helpers import free_port, stop_server

    pytest.importorskip("cryptography")
    key, cert = _self_signed(tmp_path)
    model = str(demo_model_path(tmp_path))  # built here, then served by path with no --served-model-name
    generation = Path(model) / "generation_config.json"
    generation.write_text(json.dumps(dict(json.loads(generation.read_text()), temperature=0.6, top_k=20)))
    port = free_port()
    with open(tmp_path / "serve.log", "wb") as log:  # the child keeps its own descriptor
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "ringllm",
                "serve",
                model,
                "--port",
                str(port),
                "--device",
                "cpu",
                "--enable-prefix-caching",
                "--enable-chunked-prefill",
                "--trust-remote-code",
                "--disable-log-requests",
                "--enable-auto-tool-choice",
                "--kv-cache-tokens",
                "1024",
                "--context-len",
                "128",
                "--ssl-keyfile",
                str(key),
                "--ssl-certfile",
                str(cert),
            ],
            env=dict(os.environ, RINGLLM_CACHE=str(tmp_path)),
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"https://127.0.0.1:{port}"
    trust = __import__("ssl").create_default_context(cafile=str(cert))  # only this certificate
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "serve.log").read_text()[-3000:]
            try:
                if httpx.get(base + "/health", verify=trust, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.3)
        _wait_for_workers(tmp_path / "serve.log", 1)
        with pytest.raises(httpx.HTTPError):  # plain HTTP on the TLS port is not served
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=5)
        models = httpx.get(base + "/v1/models", verify=trust, timeout=10).json()["data"]
        assert [m["id"] for m in models] == [model]
        r = httpx.post(
            base + "/v1/completions", verify=trust, timeout=30, json={"model": model, "prompt": "hi", "max_tokens": 2}
        )
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2
        run = subprocess.run(
            [sys.executable, "-m", "ringllm", "health", "--pid", str(proc.pid)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        log = (tmp_path / "serve.log").read_text()
        assert f"ringllm ready on {base} | model {model} |" in log
        defaults = next(json.loads(line) for line in log.splitlines() if "sampling defaults from" in line)
        assert defaults["event"].startswith(f"sampling defaults from {generation}")
        assert (defaults["temperature"], defaults["top_k"]) == (0.6, 20) and "top_p" not in defaults
    finally:
        if proc.poll() is None:
            stop_server(proc)
        else:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)


# ---- metrics ----
def _families(base: str) -> dict:
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    return {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics", timeout=10).text)}


def _value(families: dict, sample: str, **labels) -> float:
    family = families[sample.removesuffix("_total").removesuffix("_count").removesuffix("_sum")]
    return next(s.value for s in family.samples if s.name == sample and labels.items() <= s.labels.items())


def test_metrics_carry_model_name_engine_histograms_prefix_counters_and_process_metrics(served):
    import httpx

    _, base, _ = served
    prompt = list(range(10, 42))  # 32 tokens, sent three times: the second and third find it cached
    before = _families(base)
    for _ in range(3):
        r = httpx.post(
            base + "/v1/completions", json={"prompt": prompt, "max_tokens": 4, "ignore_eos": True}, timeout=30
        )
        assert r.json()["usage"]["completion_tokens"] == 4
    after = _families(base)
    for family in after.values():
        if family.name.startswith("ringllm_"):
            assert all(s.labels.get("model_name") == "Org/Model-8B" for s in family.samples), family.name
    for name in (
        "request_queue_time_seconds",
        "request_prefill_time_seconds",
        "request_decode_time_seconds",
        "request_prompt_tokens",
        "request_generation_tokens",
    ):
        assert after["ringllm_" + name].type == "histogram"
        count = f"ringllm_{name}_count"
        assert _value(after, count) - _value(before, count) == 3, name

    def grown(sample: str) -> float:
        return _value(after, sample) - _value(before, sample)

    assert grown("ringllm_request_generation_tokens_sum") == 12
    assert grown("ringllm_request_prompt_tokens_sum") == 96
    assert grown("ringllm_prefix_cache_queries_total") >= 96
    assert grown("ringllm_prefix_cache_hits_total") >= 2 * 31  # at least all but the last token, twice
    assert after["ringllm_prefix_cache_hits"].type == after["ringllm_prefix_cache_queries"].type == "counter"
    assert _value(after, "process_cpu_seconds_total") > 0 and _value(after, "process_resident_memory_bytes") > 0


def test_every_series_the_grafana_dashboard_queries_is_exposed(served):
    """docs/grafana-dashboard.json: each metric name in its PromQL is a sample name /metrics serves, and the
    dashboard's model_name variable matches what the series carry."""
    import json
    import re

    import httpx

    _, base, _ = served
    httpx.post(base + "/v1/completions", json={"prompt": "dashboard", "max_tokens": 2}, timeout=30)
    served_samples = {s.name for f in _families(base).values() for s in f.samples}
    dashboard = json.loads((ROOT / "docs/grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {name for e in exprs for name in re.findall(r"\b((?:ringllm|process)_[a-z0-9_]+)", e)}
    assert len(used) >= 15 and used <= served_samples, used - served_samples
    assert all('model_name=~"$model_name"' in e for e in exprs if "ringllm_" in e)
