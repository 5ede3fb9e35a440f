#!/usr/bin/env bash
# ringllm's half of a side-by-side lease, the call after scripts/gpu_vllm_all.sh on the same machine (carry .gpu;
# `source .gpu/setup.sh` first): on the same random Qwen3-0.6B-shape checkpoint, scripts/bench.py's nano, batch-1
# latency and prefix workloads twice in one process, nano with fp8 KV twice, then nano over HTTP with the same
# scripts/bench_client.py command vLLM's server got (256 streams). Then, with what is left of the call, the GPU
# tests (pytest -m gpu tests/engine) bounded by TEST_LIMIT seconds. Logs and JSON go to ${OUT:-.}.
set -u
out=$(cd "${OUT:-.}" && pwd)
shape=scripts/shapes/qwen3-0.6b.json
python3 scripts/bench.py --shape $shape --workload all --repeat 2 --json "$out/ringllm.json" \
  > "$out/ringllm_bench.log" 2>&1
sed -n '/^workload /,$p' "$out/ringllm_bench.log"
python3 scripts/bench.py --shape $shape --workload nano --repeat 2 --kv-cache-dtype fp8 --json "$out/ringllm_fp8.json" \
  > "$out/ringllm_fp8.log" 2>&1
sed -n '/^workload /,$p' "$out/ringllm_fp8.log"
python3 -m ringllm serve --model /tmp/ringllm-bench/qwen3-0.6b --host 127.0.0.1 --port 8000 --context-len 4096 \
  --max-bs 256 --max-num-batched-tokens 16384 --workers "${WORKERS:-2}" > "$out/ringllm_serve.log" 2>&1 &
pid=$!
for _ in $(seq 180); do curl -sf 127.0.0.1:8000/health > /dev/null && break; sleep 1; done
python3 scripts/bench_client.py --base-url http://127.0.0.1:8000/v1 --workload nano --concurrency 256 --no-progress \
  --json "$out/ringllm_http_nano.json" 2>&1 | tail -4
kill -TERM $pid
wait $pid
timeout "${TEST_LIMIT:-300}" python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/engine > "$out/pytest-gpu.log" 2>&1
echo "pytest -m gpu: rc $?"
tail -8 "$out/pytest-gpu.log"
