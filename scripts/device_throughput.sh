#!/usr/bin/env bash
# The throughput issue's device runs (docs/performance.md, "Offline throughput"):
#   tests:   the GPU tests of the paths this issue touches (graphs captured at start-up, compiling
#            ahead, sampling), and any test files named after it
#   bench:   launch.bench mode=throughput on dummy gpt-oss-20b (and 120b with `bench 120b`)
#   profile: scripts/profile_throughput.py, a throughput run's steps classed and its kernels ranked
#   ab:      launch.bench mode=throughput on two trees alternately, `.base/` (main before a change,
#            carried: git archive REV | tar -x -C .base) and this one; `ab ROUNDS key=value ...`
#   settings: launch.bench mode=throughput on this tree under each setting alternately, medians;
#            `settings ROUNDS "key=value ... (every run)" "key=value ... (setting 1)" "... (setting 2)" ...`
#   kv-ab:   settings with kv_cache_dtype=auto and fp8; `kv-ab ROUNDS key=value ...`
#   latency-ab: launch.bench (batch-1 decode, time to first token of a 32k prompt) on .carry/base
#            (git archive REV | tar -x -C .carry/base) and this tree alternately; `latency-ab ROUNDS key=value ...`
#   profile-ab: scripts/profile_throughput.py (this tree's) on .carry/base's runtime and this one;
#            `profile-ab SECONDS --requests 1024 --osl 256 --profile-osl 1 --decode-window 160 30`
#   cold:    start-up with Triton's cache empty, the JSON's startup block; `cold model=gpt-oss-20b`
#   twice:   launch.bench mode=throughput twice in a row on one machine (the first pays for whatever
#            start-up left to compile: its compile rows say what); `twice key=value ...`
#   cache-out: Triton's compiled kernels (binaries and metadata) as $OUT/tcache.tgz, to carry into the
#            next calls as .carry/tcache.tgz (scripts/device_env.sh unpacks it); last in a call
#   ncu-moe: Nsight Compute on each MoE GEMM through scripts/kernel_probe.py (20b; `ncu-moe TOKENS`,
#            default 1024): tensor-pipe and issue-slot use, L2 and DRAM throughput, and why warps stall,
#            so the next GEMM change answers what holds it near 40% of the matmul rate
# Logs under $OUT, tables on stdout.
set -uo pipefail
source scripts/device_env.sh
nvidia-smi -L
what=${1:-tests}; shift || true
case "$what" in
  tests)
    timeout 540 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_cuda_graphs.py tests/test_sampling.py \
      tests/test_compile_ahead.py tests/test_compile_watch.py "$@" 2>&1 | tee $OUT/pytest.log \
      | grep -E "PASSED|FAILED|SKIPPED|ERROR| passed| failed"
    ;;
  bench)
    model=${1:-gpt-oss-20b}; shift || true
    timeout 560 python3 -m launch.bench mode=throughput checkpoint=dummy model=$model device=cuda \
      json=$OUT/throughput_$model.json "$@" 2>&1 | tee $OUT/bench_$model.log | grep -v "^$"
    ;;
  ab)
    rounds=${1:-2}; shift || true
    for round in $(seq "$rounds"); do
      for tree in .base .; do
        name=$([ "$tree" = . ] && echo new || echo base)
        (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 280 python3 -m launch.bench mode=throughput \
          checkpoint=dummy device=cuda json=$OUT/ab_${name}_$round.json "$@") > $OUT/ab_${name}_$round.log 2>&1
        echo "round $round $name: $(grep -h 'output tokens/s per GPU' $OUT/ab_${name}_$round.log | head -1)"
      done
    done
    python3 - "$OUT" <<'PY'
import glob, json, statistics, sys
runs = {}
for path in sorted(glob.glob(f"{sys.argv[1]}/ab_*_*.json")):
    runs.setdefault(path.split("ab_")[1].split("_")[0], []).append(
        json.load(open(path))["output_tokens_per_s_per_gpu"])
base, new = runs.get("base", []), runs.get("new", [])
print("| output tokens/s per GPU | base (runs) | new (runs) | new / base (medians) |\n|---|---|---|---:|")
ratio = statistics.median(new) / statistics.median(base) if base and new else float("nan")
print(f"| | {', '.join(f'{v:,.0f}' for v in base)} | {', '.join(f'{v:,.0f}' for v in new)} | {ratio:.4f} |")
PY
    ;;
  kv-ab)  # settings ROUNDS "key=value ..." kv_cache_dtype=auto kv_cache_dtype=fp8
    rounds=${1:-2}; shift || true
    bash "$0" settings "$rounds" "$*" kv_cache_dtype=auto kv_cache_dtype=fp8
    ;;
  settings)
    rounds=${1:-2}; common=${2:-}; shift 2 || true
    for round in $(seq "$rounds"); do
      for variant in "$@"; do
        name=$(echo "$variant" | tr -c 'A-Za-z0-9_.\n' '_')
        # shellcheck disable=SC2086  # common and variant are lists of key=value words
        timeout 280 python3 -m launch.bench mode=throughput checkpoint=dummy device=cuda $common $variant \
          json=$OUT/setting_${name}_$round.json > $OUT/setting_${name}_$round.log 2>&1
        echo "round $round $variant: $(grep -hE 'output tokens/s per GPU|KV cache|mean running' \
          $OUT/setting_${name}_$round.log | tr -s ' ' | paste -sd';')"
      done
    done
    python3 - "$OUT" "$@" <<'PY'
import glob, json, re, statistics, sys
out, variants = sys.argv[1], sys.argv[2:]
print("| setting | output tokens/s per GPU (runs) | median | / first setting |\n|---|---|---:|---:|")
first = None
for variant in variants:
    name = re.sub(r"[^A-Za-z0-9_.]", "_", variant)
    runs = [json.load(open(p))["output_tokens_per_s_per_gpu"]
            for p in sorted(glob.glob(f"{out}/setting_{name}_*.json"))]
    if not runs:
        print(f"| {variant} | (no run finished) | | |")
        continue
    median = statistics.median(runs)
    first = first or median
    print(f"| {variant} | {', '.join(f'{v:,.0f}' for v in runs)} | {median:,.0f} | {median / first:.3f} |")
PY
    ;;
  latency-ab)
    rounds=${1:-2}; shift || true
    for round in $(seq "$rounds"); do
      for tree in .carry/base .; do
        name=$([ "$tree" = . ] && echo new || echo base)
        (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 200 python3 -m launch.bench checkpoint=dummy \
          model=gpt-oss-20b device=cuda "batch_sizes=[1]" "ttft_prompts=[32768]" decode_tokens=128 repeat=3 \
          max_batch_size=64 "$@") > $OUT/latency_${name}_$round.log 2>&1
        echo "round $round $name: $(grep -hE 'decode tokens/s, batch 1 |32,768-token' $OUT/latency_${name}_$round.log \
          | cut -d'|' -f2-3 | tr -s ' ' | paste -sd';')"
      done
    done
    ;;
  profile)
    timeout 560 python3 scripts/profile_throughput.py "$@" 2>&1 | tee $OUT/profile.log
    ;;
  profile-ab)  # scripts/profile_throughput.py on .carry/base and this tree; `profile-ab SECONDS args ...`
    limit=${1:-250}; shift || true
    for tree in .carry/base .; do
      name=$([ "$tree" = . ] && echo new || echo base)
      # the script of this tree (it may be newer than the base's) on each tree's runtime
      PYTHONPATH=/tmp/site:$PWD/$tree timeout "$limit" python3 scripts/profile_throughput.py "$@" \
        > $OUT/profile_$name.log 2>&1
      echo "== $name (rc $?)"; grep -v "^$" $OUT/profile_$name.log | grep -E "^\||output tok/s" | head -40
    done
    ;;
  twice)
    for run in 1 2; do
      timeout 280 python3 -m launch.bench mode=throughput checkpoint=dummy device=cuda \
        json=$OUT/twice_$run.json "$@" > $OUT/twice_$run.log 2>&1
      echo "run $run (rc $?): $(grep -hE 'output tokens/s per GPU|timed run|Triton compiles|compiled ahead|graph capture' \
        $OUT/twice_$run.log | tr -s ' ' | cut -c1-400 | paste -sd';')"
    done
    ;;
  cache-out)
    (cd "$TRITON_CACHE_DIR" && find . -name '*.cubin' -o -name '*.json' \
      | tar czf $OUT/tcache.tgz -T -) && ls -l $OUT/tcache.tgz
    ;;
  ncu-moe)
    tokens=${1:-1024}
    for gemm in 1 2; do  # mlp1, mlp2; the third launch of _moe_gemm_kernel (the first two: compile, warm)
      timeout 240 ncu --clock-control none --kernel-name regex:_moe_gemm_kernel --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section ComputeWorkloadAnalysis --section MemoryWorkloadAnalysis \
        --section SchedulerStats --section WarpStateStats --section Occupancy --section LaunchStats \
        --print-details all python3 scripts/kernel_probe.py moe --model gpt-oss-20b --tokens "$tokens" \
        --gemm $gemm > $OUT/ncu_moe_$gemm.txt 2>&1
      echo "== mlp$gemm at $tokens tokens: ncu rc=$?"
      grep -E "Duration|Compute \(SM\) Throughput|L2 Cache Throughput|DRAM Throughput|Issue Slots|\
Issued Warp|No Eligible|Active Warps Per|Warp Cycles Per Issued|Stall|Registers Per|Achieved Occupancy|Tensor" \
        $OUT/ncu_moe_$gemm.txt | head -45
    done
    ;;
  cold)  # graph capture with Triton's cache empty (a machine's first run); `cold model=... [key=value ...]`
    cache=$(mktemp -d)
    TRITON_CACHE_DIR=$cache timeout 400 python3 -m launch.bench mode=throughput checkpoint=dummy device=cuda \
      isl=64 osl=4 requests=8 json=$OUT/cold.json "$@" > $OUT/cold.log 2>&1
    echo "cold start rc=$?: $(python3 -c "import json; print(json.load(open('$OUT/cold.json'))['startup'])")"
    ;;
esac
