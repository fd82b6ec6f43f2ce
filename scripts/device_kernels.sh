#!/usr/bin/env bash
# The kernels issue's device run: GPU tests (Triton vs reference at real shapes), the MoE benchmark,
# and end-to-end decode of dummy gpt-oss-20b with the Triton experts against the reference path.
set -euo pipefail
source scripts/device_env.sh
nvidia-smi -L
python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -k "triton or mxfp4" 2>&1 | tail -4
python3 scripts/bench_moe.py --model gpt-oss-20b --reference
python3 scripts/bench_moe.py --model gpt-oss-120b --tokens 1 64 4096
python3 scripts/baseline_bench.py --model gpt-oss-20b --batch 1 64 --json $OUT/e2e_triton_moe.json | tail -3
