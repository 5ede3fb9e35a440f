#!/usr/bin/env bash
# Creates .venv and installs ringllm into it.
#   scripts/setup.sh          what serving needs (the quick start: .venv/bin/ringllm serve)
#   scripts/setup.sh --dev    that plus the test tools (pytest, lm_eval, schemathesis, hadolint, ...)
# On a machine without an NVIDIA GPU it installs the CPU build of PyTorch (pinned to 2.13.0, which resolves to
# the CPU wheel on this project's CI machines), never the CUDA wheels. RINGLLM_TORCH overrides the requirement.
set -euo pipefail
cd "$(dirname "$0")/.."
extras=""
for arg in "$@"; do
  case "$arg" in
    --dev) extras="[dev]" ;;
    -h|--help) sed -n '2,6p' "$0"; exit 0 ;;
    *) echo "scripts/setup.sh: unknown argument $arg (use --dev for the test tools)" >&2; exit 2 ;;
  esac
done
python3 -m venv .venv
if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  torch_req=${RINGLLM_TORCH:-torch}
else
  torch_req=${RINGLLM_TORCH:-torch==2.13.0}
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q "$torch_req"
.venv/bin/python -m pip install -q -e ".${extras}"
.venv/bin/python -c 'import torch; print("ringllm set up: torch", torch.__version__, "| cuda:", torch.cuda.is_available())'
