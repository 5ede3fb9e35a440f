#!/usr/bin/env bash
# The soak tests: a few minutes of mixed requests with random disconnects against one `ringllm serve` on the
# demo model, then checks for leaked KV slots, segments and memory growth (tests/e2e/test_soak.py); and issue 28's
# attacks beside normal traffic, /health and the normal streams' token gaps watched (tests/e2e/test_abuse_soak.py;
# RINGLLM_SOAK_MAX_GAP, default 5 s: the demo model runs on the CPU).
#   scripts/soak.sh            # 180 s
#   RINGLLM_SOAK_SECONDS=600 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -m soak -q -s -p no:cacheprovider tests/e2e/test_soak.py tests/e2e/test_abuse_soak.py "$@"
