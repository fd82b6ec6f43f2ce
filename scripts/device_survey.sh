#!/usr/bin/env bash
# One call that surveys where offline throughput stands (issue 19), on one GPU:
#   1. the GPU attention tests (the mixed step's decodes in their own launch among them)
#   2. the MoE GEMMs alone at the batch sizes an offline run steps through (scripts/bench_moe.py)
#   3. Nsight Compute on the wgmma GEMM at two of them: tensor-pipe use, stalls, occupancy
#   4. launch.bench: batch-1 decode (no regression) and the time to first token of a 32k prompt
#   verify: the GPU tests of the MoE kernels, the MXFP4 decode and the CUDA graphs (bit-exactness)
#   mixed: the GPU test of a mixed step's decodes in their own attention launch
#   moe_ab, latency_ab: step 2 (all batch sizes) and batch-1 / batch-64 decode on two trees alternately,
#            `.base/` (main before a change, carried: git archive REV | tar -x -C .base) and this one
# `bash scripts/device_survey.sh [steps...]` (default: tests moe ncu latency). Logs under $OUT.
set -uo pipefail
source scripts/device_env.sh
nvidia-smi -L

# on_both_trees ROUNDS LOG SHOWN COMMAND...: COMMAND in .base/ then in this tree, ROUNDS times; the
# output appended to $OUT/LOG_base.log and $OUT/LOG_new.log, its lines matching SHOWN printed
on_both_trees() {
  local rounds=$1 log=$2 shown=$3 round tree name
  shift 3
  for round in $(seq "$rounds"); do
    for tree in .base .; do
      name=$([ "$tree" = . ] && echo new || echo base)
      echo "== $name"
      (cd "$tree" && "$@" 2>&1) | tee -a "$OUT/${log}_$name.log" | grep -E "$shown"
    done
  done
}

steps=${*:-tests moe ncu latency}
for step in $steps; do
  start=$SECONDS
  case "$step" in
    tests)
      timeout 240 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_attention.py 2>&1 \
        | tee $OUT/pytest_attention.log | grep -E "FAILED|ERROR| passed| failed"
      ;;
    moe)
      timeout 200 python3 scripts/bench_moe.py --model gpt-oss-20b gpt-oss-120b --tokens 256 1024 2048 8192 \
        --rep 50 2>&1 | tee $OUT/bench_moe.log | grep -E "^\||TFLOP"
      ;;
    ncu)
      ncu=$(command -v ncu || ls /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
      for tokens in 1024 8192; do
        for gemm in 1 2; do
          timeout 100 "$ncu" --clock-control none -k regex:_moe_gemm_kernel --launch-skip 2 --launch-count 1 \
            --section SpeedOfLight --section ComputeWorkloadAnalysis --section WarpStateStats \
            --section Occupancy --section LaunchStats --section SchedulerStats \
            python3 scripts/kernel_probe.py moe --model gpt-oss-20b --tokens $tokens --gemm $gemm \
            > $OUT/ncu_moe_${tokens}_$gemm.txt 2>&1
          grep -E "moe_gemm_kernel|Duration|Compute \(SM\) Throughput|Issue Slots Busy|Achieved Occupancy|Registers Per" \
            $OUT/ncu_moe_${tokens}_$gemm.txt
        done
      done
      ;;
    verify)
      timeout 200 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_moe.py tests/test_mxfp4.py \
        tests/test_cuda_graphs.py 2>&1 | tee $OUT/pytest_verify.log | grep -E "FAILED|ERROR| passed| failed"
      ;;
    mixed)
      timeout 200 python3 -m pytest -v -p no:cacheprovider -m gpu tests/test_attention.py -k mixed_step_decodes \
        2>&1 | tee $OUT/pytest_mixed.log | grep -E "FAILED|ERROR| passed| failed"
      ;;
    latency)
      timeout 240 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda "batch_sizes=[1]" \
        "ttft_prompts=[32768]" decode_tokens=128 repeat=3 json=$OUT/latency_20b.json 2>&1 \
        | tee $OUT/latency_20b.log | grep -E "^\|"
      ;;
    moe_ab)
      on_both_trees 1 bench_moe "^\||tokens|TFLOP" timeout 150 python3 scripts/bench_moe.py \
        --model gpt-oss-20b gpt-oss-120b --tokens 1 64 256 1024 2048 8192 --rep 30
      ;;
    latency_ab)
      on_both_trees 2 latency "^\|" timeout 150 python3 -m launch.bench checkpoint=dummy \
        model=gpt-oss-20b device=cuda "batch_sizes=[1,64]" decode_tokens=128 repeat=3 max_batch_size=64
      ;;
  esac
  echo "($step took $((SECONDS - start)) s)"
done
