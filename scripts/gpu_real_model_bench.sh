#!/usr/bin/env bash
# The real-model benchmark, in one device call on the GPU host (carry .gpu and .vllm-run; the vLLM bundle already
# installed in /tmp/vsite; the GGUF's parts already stored by `bash scripts/gpu_real_parts.sh store` calls):
#   bash scripts/gpu_real_model_bench.sh
# 1. joins the test suite's GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M) from its parts and checks its sha256;
# 2. converts it to a bf16 safetensors directory for vLLM (scripts/gguf_to_safetensors.py, timed);
# 3. serves the GGUF with ringllm (which dequantizes it to bf16 itself), then the directory with `vllm serve`, each
#    alone on the GPU with the same limits (context, sequences, batched tokens, dtype, no generation-config
#    defaults), logs the seconds from launch to /health 200, and sends both the same scripts/bench_client.py runs
#    of scripts/data/chat_prompts.jsonl (277 coding conversations, max_tokens 128-512 per row, the same per row
#    for both) over HTTP with streaming:
#      warmup   16 conversations, 16 at once (not compared: first-request costs out of the measured runs)
#      c64      all, 64 in flight, ignore_eos, temperature 0.6: both servers generate exactly the same number of
#               tokens, so tokens/s compare like for like (the headline)
#      c256     the same with 256 in flight
#      natural  all, 64 in flight, greedy, ending at EOS: the lengths the model chooses (each server's own
#               count is reported: the two differ where bf16 kernels break a near-tie differently)
#      c1       the first 12, one at a time, ignore_eos: batch-1 latency (TTFT, TPOT)
# 4. prints a table and writes summary.json. Everything is bounded: the call must end within 600 s (BUDGET, 570 by
#    default, counts from the start; a step that would not fit is skipped and says so). Logs and JSON in $OUT.
# Knobs: WORKERS (ringllm's API workers, default 2, as in the lead's HTTP nano runs), PORT, CTX, SEQS, MNBT, DTYPE,
# PROMPTS (another jsonl, e.g. a tiny one for a CPU smoke run of ringllm's half with DTYPE=float32).
set -u
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT"
out=$(cd "${OUT:-.}" && pwd)
T0=$(date +%s)
BUDGET=${BUDGET:-570}
PORT=${PORT:-8011}
CTX=${CTX:-4096} SEQS=${SEQS:-256} MNBT=${MNBT:-8192} WORKERS=${WORKERS:-2} DTYPE=${DTYPE:-bfloat16}
NAME=qwen2.5-coder-0.5b-instruct
ST=/tmp/qwc-st
PROMPTS=${PROMPTS:-scripts/data/chat_prompts.jsonl}
BASE_PYTHONPATH=${PYTHONPATH:-}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

elapsed() { echo $(($(date +%s) - T0)); }
left() { echo $((BUDGET - $(elapsed))); }
say() { echo "[$(elapsed)s] $*" | tee -a "$out/summary.log"; }

# ringllm's environment (wheels in /tmp/site, FlashInfer's saved kernels) for ringllm, the conversion and the client
source .gpu/setup.sh > "$out/setup.log" 2>&1 || { cat "$out/setup.log"; say "setup: .gpu/setup.sh failed"; exit 1; }
RL_PYTHONPATH=$PYTHONPATH
say "$(tail -1 "$out/setup.log")"

# 1. the model
GGUF=$(bash scripts/gpu_real_parts.sh join 2>&1 | tail -1)
[ -f "$GGUF" ] || { say "join: $GGUF"; exit 1; }
say "gguf: $GGUF ($(stat -c %s "$GGUF") bytes, sha256 checked)"

# 2. the same weights for vLLM
t=$(date +%s)
if timeout 150 python3 scripts/gguf_to_safetensors.py "$GGUF" "$ST" > "$out/convert.log" 2>&1; then
  say "convert: $ST in $(($(date +%s) - t)) s: $(grep '^convert: files' "$out/convert.log")"
else
  tail -20 "$out/convert.log"
  say "convert: FAILED after $(($(date +%s) - t)) s (convert.log); vLLM's half cannot run"
fi

PID=""
start_server() {  # start_server LABEL LIMIT_S CMD...: launched in its own session; the seconds to /health 200
  local label=$1 limit=$2
  shift 2
  setsid "$@" > "$out/${label}_serve.log" 2>&1 &
  PID=$!
  local t=$(date +%s)
  until curl -sf "127.0.0.1:$PORT/health" > /dev/null 2>&1; do
    if ! kill -0 "$PID" 2>/dev/null; then
      say "$label: the server exited during start-up (${label}_serve.log):"
      tail -25 "$out/${label}_serve.log"
      PID=""
      return 1
    fi
    if [ $(($(date +%s) - t)) -ge "$limit" ]; then
      say "$label: not healthy within $limit s (${label}_serve.log)"
      tail -25 "$out/${label}_serve.log"
      stop_server "$label"
      return 1
    fi
    sleep 0.5
  done
  say "$label: /health 200 after $(($(date +%s) - t)) s from launch"
  echo "$(($(date +%s) - t))" > "$out/${label}_startup_s"
}

stop_server() {  # TERM to the server's session, KILL what is left of it after 30 s
  [ -n "$PID" ] || return 0
  kill -TERM -- "-$PID" 2>/dev/null
  for _ in $(seq 60); do kill -0 "$PID" 2>/dev/null || break; sleep 0.5; done
  kill -KILL -- "-$PID" 2>/dev/null
  wait "$PID" 2>/dev/null
  PID=""
  say "$1: stopped"
}
trap 'stop_server exit' EXIT

bench() {  # bench LABEL RUN LIMIT_S ARGS...: one bench_client run against the server on $PORT
  local label=$1 run=$2 limit=$3
  shift 3
  if [ "$(left)" -lt 20 ]; then
    say "$label $run: skipped, $(left) s left"
    return 1
  fi
  [ "$limit" -le "$(($(left) - 15))" ] || limit=$(($(left) - 15))
  PYTHONPATH=$RL_PYTHONPATH timeout "$limit" python3 scripts/bench_client.py --base-url "http://127.0.0.1:$PORT/v1" \
    --backend openai-chat --workload jsonl --file "$PROMPTS" --no-progress --timeout 300 \
    --json "$out/${label}_${run}.json" "$@" > "$out/${label}_${run}.log" 2>&1
  local rc=$?
  say "$label $run (rc $rc): $(grep -A1 '^ *done' "$out/${label}_${run}.log" | tail -1)"
}

bench_all() {  # the same five runs for either server
  bench "$1" warmup 60 --num-requests 16 --max-concurrency 16 --ignore-eos
  bench "$1" c64 120 --max-concurrency 64 --ignore-eos
  bench "$1" c256 120 --max-concurrency 256 --ignore-eos
  bench "$1" natural 120 --max-concurrency 64 --temperature 0
  bench "$1" c1 90 --num-requests 12 --max-concurrency 1 --ignore-eos
}

# 3a. ringllm on the GGUF
# at most 240 s to start (a cold FlashInfer compile for head size 64 takes ~3 min), leaving vLLM ~250 s
limit=$(($(left) - 250)); [ $limit -le 240 ] || limit=240
if start_server ringllm "$limit" env PYTHONPATH="$RL_PYTHONPATH" python3 -m ringllm serve --model "$GGUF" \
  --served-model-name "$NAME" --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" --context-len "$CTX" \
  --max-num-seqs "$SEQS" --max-num-batched-tokens "$MNBT" --generation-config vllm --workers "$WORKERS"; then
  bench_all ringllm
  stop_server ringllm
fi

# 3b. vLLM on the converted directory (its own bundle first on the path, not ringllm's wheels)
if [ -f "$ST/model.safetensors" ] && [ -d /tmp/vsite/vllm ]; then
  if [ "$(left)" -gt 90 ]; then
    if start_server vllm "$(($(left) - 60))" bash -c 'PYTHONPATH=$1; source .vllm-run/env.sh; shift; exec "$@"' _ \
      "$BASE_PYTHONPATH" python3 -m vllm.entrypoints.cli.main serve "$ST" --served-model-name "$NAME" \
      --host 127.0.0.1 --port "$PORT" --dtype "$DTYPE" --max-model-len "$CTX" --max-num-seqs "$SEQS" \
      --max-num-batched-tokens "$MNBT" --generation-config vllm; then
      bench_all vllm
      stop_server vllm
    fi
  else
    say "vllm: skipped, $(left) s left"
  fi
else
  say "vllm: skipped (no $ST/model.safetensors, or no bundle in /tmp/vsite)"
fi

# 4. side by side
PYTHONPATH=$RL_PYTHONPATH python3 - "$out" <<'PY' | tee -a "$out/summary.log"
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
keys = ("completed", "failed", "total_input_tokens", "total_output_tokens", "output_throughput",
        "request_throughput", "median_ttft_ms", "p99_ttft_ms", "median_tpot_ms", "median_itl_ms", "median_e2el_ms")
summary = {}
for server in ("ringllm", "vllm"):
    s = summary[server] = {}
    p = out / f"{server}_startup_s"
    s["startup_s"] = int(p.read_text()) if p.exists() else None
    for run in ("c64", "c256", "natural", "c1"):
        f = out / f"{server}_{run}.json"
        if f.exists():
            d = json.loads(f.read_text())
            s[run] = {k: d.get(k) for k in keys}
(out / "summary.json").write_text(json.dumps(summary, indent=2))
fmt = lambda v: "-" if v is None else (f"{v:,.1f}" if isinstance(v, float) else f"{v:,}")
print(f"{'run':<8} {'server':<8} {'done':>5} {'fail':>4} {'in tok':>8} {'out tok':>8} {'out tok/s':>10} "
      f"{'TTFT p50':>9} {'TPOT p50':>9} {'E2E p50':>9}")
for run in ("c64", "c256", "natural", "c1"):
    for server in ("ringllm", "vllm"):
        r = summary[server].get(run)
        if r:
            print(f"{run:<8} {server:<8} {fmt(r['completed']):>5} {fmt(r['failed']):>4} {fmt(r['total_input_tokens']):>8} "
                  f"{fmt(r['total_output_tokens']):>8} {fmt(r['output_throughput']):>10} {fmt(r['median_ttft_ms']):>9} "
                  f"{fmt(r['median_tpot_ms']):>9} {fmt(r['median_e2el_ms']):>9}")
    a, b = summary["ringllm"].get(run), summary["vllm"].get(run)
    if a and b and b["output_throughput"]:
        print(f"{run:<8} ratio    ringllm/vLLM output tok/s {a['output_throughput'] / b['output_throughput']:.2f}x")
print("start-up to /health, s: ringllm", summary["ringllm"]["startup_s"], "| vLLM", summary["vllm"]["startup_s"])
PY
# FlashInfer kernels compiled in this call, for .gpu/kernels.tgz next time (head size 64 is this model's)
if [ -f .gpu/save-kernels.sh ] && [ "$(left)" -gt 15 ]; then OUT=$out timeout 15 bash .gpu/save-kernels.sh > /dev/null 2>&1; fi
say "done in $(elapsed) s"
