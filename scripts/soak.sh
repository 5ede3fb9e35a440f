#!/usr/bin/env bash
# The soak test (tests/e2e/test_soak.py): a few minutes of mixed requests with random disconnects against one
# `ringllm serve` on the demo model, then checks for leaked KV slots, segments and memory growth.
#   scripts/soak.sh            # 180 s
#   RINGLLM_SOAK_SECONDS=600 scripts/soak.sh
set -euo pipefail
cd "$(dirname "$0")/.."
exec .venv/bin/python -m pytest -m soak -q -s -p no:cacheprovider tests/e2e/test_soak.py "$@"
