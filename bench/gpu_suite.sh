#!/usr/bin/env bash
# Every GPU path once, one table per section and a summary (bench/gpu_suite.py; bench/README.md).
#   bash bench/gpu_suite.sh          # one GPU, <= 8 minutes
#   bash bench/gpu_suite.sh --tiny   # tiny sizes on the CPU
set -euo pipefail
cd "$(dirname "$0")/.."
# the tables, not the libraries' loading chatter
export DIFFUSERS_VERBOSITY=error TRANSFORMERS_VERBOSITY=error HF_HUB_DISABLE_PROGRESS_BARS=1
exec python -m bench.gpu_suite "$@"
