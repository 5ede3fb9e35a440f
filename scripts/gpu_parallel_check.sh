#!/usr/bin/env bash
# On a host with 2 GPUs (after `source .gpu/setup.sh`): the GPU tests (TP=2 and PP=2 included), then the
# nano workload on a Qwen3-8B-shape random checkpoint at TP=2, TP=1 and PP=2. Every run is bounded: one that
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
  tests/test_gpu.py -k parallel
tail -4 "$out/pytest-parallel.log"
wait $build
for cfg in "--tp-size 2" "--tp-size 1" "--pp-size 2"; do
  name=nano-8b-$(echo "$cfg" | tr -d ' -')
  bounded "${BENCH_LIMIT:-110}" "$out/$name.log" python3 scripts/bench.py --model "$ckpt" --workload nano $cfg \
    --json "$out/$name.json"
  tail -1 "$out/$name.log" | cut -c1-200
done
