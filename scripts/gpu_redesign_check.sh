#!/usr/bin/env bash
# The GPU checks of the engine redesign (issue 23, items 4-8: the two-phase step, the runner split and its
# result sink, the sampler's row table and min_tokens, the kernels package, the torch-free core), on one GPU,
# after `source .gpu/setup.sh`. Two stages, each well inside a 10-minute call; logs and JSON go to ${OUT:-.}:
#
#   bash scripts/gpu_redesign_check.sh tests   # pytest -m gpu over tests/engine (the 2-GPU tests skip on one)
#   bash scripts/gpu_redesign_check.sh bench   # bench.py (nano, batch-1 latency, prefix; twice) and
#                                              # bench_structured.py (STRUCTURED=0 leaves it out), on BASELINE
#                                              # first when it is set, then here
#
# BASELINE: a checkout of the commit to compare with, on the same machine in the same lease (timings from
# different machines do not compare), e.g. `git worktree add /tmp/base main` and BASELINE=/tmp/base.
# Every run is bounded: one that overruns gets SIGUSR1 (stacks into its log), then SIGKILL.
set -u
out=$(cd "${OUT:-.}" && pwd)
here=$(cd "$(dirname "$0")/.." && pwd)

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

tests() {
  cd "$here" || exit 1
  bounded "${TEST_LIMIT:-540}" "$out/pytest-gpu.log" python3 -m pytest -m gpu -q -p no:cacheprovider -rs tests/engine
  tail -6 "$out/pytest-gpu.log"
}

bench() {  # the same commands in each tree: BASELINE first, then this one
  for tree in ${BASELINE:-} "$here"; do
    cd "$tree" || exit 1
    local name
    name=$(basename "$tree")
    bounded "${BENCH_LIMIT:-300}" "$out/bench-$name.log" python3 scripts/bench.py \
      --shape scripts/shapes/qwen3-0.6b.json --workload all --repeat 2 --json "$out/bench-$name.json"
    sed -n '/^workload /,$p' "$out/bench-$name.log"  # bench.py's closing table
    [ "${STRUCTURED:-1}" = 0 ] && continue
    bounded "${BENCH_LIMIT:-300}" "$out/structured-$name.log" python3 scripts/bench_structured.py \
      --shape scripts/shapes/qwen3-0.6b.json --constrained-fraction 0.1 --json "$out/structured-$name.json"
    tail -3 "$out/structured-$name.log"
  done
}

case "${1:-}" in
  tests) tests ;;
  bench) bench ;;
  *) echo "usage: $0 tests|bench" >&2; exit 2 ;;
esac
