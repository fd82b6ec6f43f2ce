#!/usr/bin/env bash
# The throughput issue's device runs (docs/performance.md, "Offline throughput"):
#   tests:   the GPU tests of the paths this issue touches (graphs captured at start-up, sampling)
#   bench:   launch.bench mode=throughput on dummy gpt-oss-20b (and 120b with `bench 120b`)
#   profile: scripts/profile_throughput.py, a throughput run's steps classed and its kernels ranked
# Logs under $OUT, tables on stdout.
set -uo pipefail
source scripts/device_env.sh
nvidia-smi -L
what=${1:-tests}; shift || true
case "$what" in
  tests)
    timeout 300 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_cuda_graphs.py tests/test_sampling.py \
      "$@" 2>&1 | tee $OUT/pytest.log | grep -E "PASSED|FAILED|SKIPPED|ERROR| passed| failed"
    ;;
  bench)
    model=${1:-gpt-oss-20b}; shift || true
    timeout 560 python3 -m launch.bench mode=throughput checkpoint=dummy model=$model device=cuda \
      json=$OUT/throughput_$model.json "$@" 2>&1 | tee $OUT/bench_$model.log | grep -v "^$"
    ;;
  profile)
    timeout 560 python3 scripts/profile_throughput.py "$@" 2>&1 | tee $OUT/profile.log
    ;;
esac
