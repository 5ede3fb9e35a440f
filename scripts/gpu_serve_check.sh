#!/usr/bin/env bash
# On a GPU host (after `source .gpu/setup.sh`): serve the Qwen3-0.6B-shape random checkpoint and run
# bench_client's nano workload against it, next to the offline engine benchmark. Logs go to ${OUT:-.}.
set -u
out=${OUT:-.}
python3 scripts/bench.py --shape scripts/shapes/qwen3-0.6b.json --workload nano --json "$out/engine-nano.json" 2>&1 | tail -2
python3 -m ringllm serve --model /tmp/ringllm-bench/qwen3-0.6b --port 8000 --context-len 4096 --max-bs 256 \
  --max-num-batched-tokens 16384 --workers "${WORKERS:-2}" > "$out/serve.log" 2>&1 &
pid=$!
for _ in $(seq 120); do curl -sf localhost:8000/health >/dev/null && break; sleep 1; done
curl -s localhost:8000/v1/completions -H 'content-type: application/json' -d '{"prompt": [1, 2, 3], "max_tokens": 8}' >/dev/null  # warm-up: Triton compiles
python3 scripts/bench_client.py --workload nano --concurrency 256 --no-progress --json "$out/client-nano.json" 2>&1 | tail -4
kill -TERM $pid; wait $pid
