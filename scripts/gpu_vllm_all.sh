#!/usr/bin/env bash
# vLLM's half of a side-by-side lease (the second part-call of ../README's vLLM bundle recipe: run it with
# .vllm-p2 and .vllm-run carried, right after `bash .vllm-run/stash.sh 1`): installs vLLM 0.26, then, on the
# same random Qwen3-0.6B-shape checkpoint scripts/bench.py uses, nano + batch-1 latency twice, nano with fp8 KV
# (scripts/gpu_vllm_nano_kv.py), the prefix
# workload with prefix caching on and off (scripts/gpu_vllm_bench.py), and nano over HTTP (vllm serve +
# scripts/bench_client.py). ringllm's half runs in the next call on the same machine. Logs go to ${OUT:-.}.
set -u
out=${OUT:-.}
bash .vllm-run/stash.sh 2 && bash .vllm-run/install.sh && source .vllm-run/env.sh || exit 1
python3 .vllm-run/make_model.py --out /tmp/qwen3-0.6b > "$out/vllm_make_model.log" 2>&1 || exit 1
for i in 1 2; do
  python3 .vllm-run/nano_offline.py --model /tmp/qwen3-0.6b --with-latency --json "$out/vllm.jsonl" \
    > "$out/vllm_nano_$i.log" 2>&1
done
python3 scripts/gpu_vllm_nano_kv.py --kv-cache-dtype fp8 --model /tmp/qwen3-0.6b --json "$out/vllm.jsonl" \
  > "$out/vllm_nano_fp8.log" 2>&1
python3 scripts/gpu_vllm_bench.py --model /tmp/qwen3-0.6b --json "$out/vllm.jsonl" > "$out/vllm_prefix.log" 2>&1
python3 scripts/gpu_vllm_bench.py --model /tmp/qwen3-0.6b --no-prefix-caching --json "$out/vllm.jsonl" \
  > "$out/vllm_prefix_off.log" 2>&1
SERVE_LOG="$out/vllm_serve.log" BENCH_JSON="$out/vllm_http_nano.json" bash .vllm-run/serve_smoke.sh \
  /tmp/qwen3-0.6b --bench > "$out/vllm_http.log" 2>&1
cut -c1-300 "$out/vllm.jsonl"
tail -5 "$out/vllm_http.log"
