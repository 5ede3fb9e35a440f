#!/usr/bin/env bash
# On a host with 2 GPUs (after `source .gpu/setup.sh`): the GPU tests (TP=2 and PP=2 included), then the
# nano workload on a Qwen3-8B-shape random checkpoint at TP=2, TP=1 and PP=2, then data parallelism (serve
# --dp-size 1 and 2 on the 0.6B shape, nano and shared-prefix over HTTP). Every run is bounded: one that
# overruns gets SIGUSR1 (each rank prints its threads' stacks into the log), then SIGKILL. Logs and JSON go
# to ${OUT:-.}.
set -u
out=${OUT:-.}
shape=scripts/shapes/qwen3-8b.json
ckpt=/tmp/ringllm-bench/qwen3-8b

bounded() {  # seconds log command...: runs the command in its own process group, killed at the limit
  local limit=$1 log=$2 t=0
  shift 2
  setsid "$@" > "$log" 2>&1 &
  local pid=$!
  while kill -0 "$pid" 2>/dev/null && [ "$t" -lt "$limit" ]; do sleep 1; t=$((t + 1)); done
  if kill -0 "$pid" 2>/dev/null; then
    echo "TIMED OUT after ${limit}s: $*" >> "$log"
    kill -USR1 -- "-$pid" 2>/dev/null; sleep 3
    kill -9 -- "-$pid" 2>/dev/null
  fi
  wait "$pid"
  echo "[$?] $* (${t}s)"
}

nvidia-smi --query-gpu=index,name,memory.used --format=csv,noheader
[ -f "$ckpt/model.safetensors" ] || python3 scripts/make_checkpoint.py "$shape" "$ckpt" --device cuda:1 \
  > "$out/make-8b.log" 2>&1 &
build=$!
bounded "${TEST_LIMIT:-240}" "$out/pytest-parallel.log" python3 -m pytest -m gpu -q -s -x -p no:cacheprovider \
  tests/engine -k parallel
tail -4 "$out/pytest-parallel.log"
wait $build
for cfg in "--tp-size 2" "--tp-size 1" "--pp-size 2"; do
  name=nano-8b-$(echo "$cfg" | tr -d ' -')
  bounded "${BENCH_LIMIT:-110}" "$out/$name.log" python3 scripts/bench.py --model "$ckpt" --workload nano $cfg \
    --json "$out/$name.json"
  tail -1 "$out/$name.log" | cut -c1-200
done

# Data parallelism (issue 17): the 0.6B shape served with --dp-size 2 (one engine per GPU) against one GPU,
# nano over HTTP, then the shared-prefix workload, whose prefix-cache hit rate (summed over the replicas by
# /metrics) shows whether cache-aware routing kept each system prompt on one replica.
small=/tmp/ringllm-bench/qwen3-0.6b
[ -f "$small/model.safetensors" ] || python3 scripts/make_checkpoint.py scripts/shapes/qwen3-0.6b.json "$small" \
  > "$out/make-0.6b.log" 2>&1
for dp in 1 2; do
  port=$((8100 + dp))
  setsid python3 -m ringllm serve --model "$small" --port $port --context-len 4096 --max-bs 256 \
    --max-num-batched-tokens 16384 --workers 2 --dp-size $dp > "$out/serve-dp$dp.log" 2>&1 &
  server=$!
  for _ in $(seq 180); do curl -sf "localhost:$port/health" > /dev/null && break; sleep 1; done
  curl -s "localhost:$port/v1/completions" -H 'content-type: application/json' \
    -d '{"prompt": [1, 2, 3], "max_tokens": 8}' > /dev/null  # warm-up
  for wl in nano shared-prefix; do
    bounded "${BENCH_LIMIT:-110}" "$out/client-dp$dp-$wl.log" python3 scripts/bench_client.py \
      --base-url "http://127.0.0.1:$port/v1" --workload $wl --concurrency 256 --no-progress \
      --json "$out/client-dp$dp-$wl.json"
    tail -3 "$out/client-dp$dp-$wl.log"
  done
  curl -s "localhost:$port/metrics" | grep -E '^ringllm_(prefix_cache_hit_rate|dp_replicas)' | tee "$out/metrics-dp$dp.txt"
  kill -TERM -- "-$server" 2>/dev/null; wait $server
done
