"""The profiler routes on a server started with --profiler-dir: /start_profile writes a trace, the profile
stops itself, /stop_profile when nothing runs writes nothing."""

import httpx

from tests.helpers import (
    gone,
    serving,
)


# ---- the profiler routes ----
def test_profiler_routes_with_profiler_dir_work_and_stop_themselves(tmp_path):
    traces = tmp_path / "traces"
    with serving(
        tmp_path,
        "--kv-cache-tokens",
        "2048",
        "--context-len",
        "256",
        "--profiler-dir",
        str(traces),
        "--profiler-max-seconds",
        "1",
    ) as (_proc, base):
        r = httpx.post(base + "/start_profile", timeout=60)
        assert r.status_code == 200 and r.json() == {"profiling": True}
        done = httpx.post(base + "/v1/completions", json={"prompt": "profiled", "max_tokens": 8}, timeout=120)
        assert done.status_code == 200
        assert gone(lambda: not list(traces.glob("trace-rank0-*.json")), 120)  # it stopped itself
        assert httpx.post(base + "/stop_profile", timeout=60).json() == {"profiling": False}
        assert len(list(traces.glob("*.json"))) == 1  # nothing was running: no second trace
        assert httpx.get(base + "/health", timeout=60).status_code == 200
