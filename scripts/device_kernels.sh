#!/usr/bin/env bash
# The kernels issue's device run. `engine`: CUDA-graph tests and launch.bench; `moe`: MoE GPU tests + the tile sweep; default: GPU tests of every
# kernel (Triton vs reference at real shapes), the kernel benchmarks, and end-to-end decode of dummy
# gpt-oss-20b against the reference path.
set -uo pipefail
source scripts/device_env.sh
nvidia-smi -L
case "${1:-all}" in
  engine)  # CUDA graphs: GPU tests, then the engine benchmark on dummy gpt-oss-20b
    timeout 300 python3 -m pytest -q tests/ -p no:cacheprovider -k "cuda_graph" 2>&1 | tail -15
    timeout 280 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda "batch_sizes=[1,8,64,256]" \
      "ttft_prompts=[8192]" repeat=2 json=$OUT/bench20b.json 2>&1 | tail -20
    ;;
  h200)  # gpt-oss-120b on one H200: the engine benchmark and where a batch-1 decode step's time goes
    timeout 200 python3 scripts/profile_decode.py --model gpt-oss-120b --batch 1 --context 1024 --steps 16 2>&1 | grep -v "^|---" | head -16
    timeout 380 python3 -m launch.bench checkpoint=dummy model=gpt-oss-120b device=cuda "batch_sizes=[1,8,64]" \
      "ttft_prompts=[8192,131072]" repeat=2 json=$OUT/bench120b.json 2>&1 | tail -12
    ;;
  tp2)  # two GPUs: CUDA-graph tests (the tp=2 one captures NCCL collectives), then where a decode step's time goes
    timeout 420 python3 -m pytest -q tests/ -p no:cacheprovider -k "cuda_graph" 2>&1 | tail -15
    timeout 150 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 256 --context 128 --steps 16 2>&1 \
      | grep -v "^|---" | head -40
    ;;
  profile-tp2)  # where decode steps' time goes: gpt-oss-120b at tp=2 (rank 0's kernels), gpt-oss-20b on one GPU
    timeout 240 python3 -m pytest -q tests/ -p no:cacheprovider -k "cuda_graph" 2>&1 | tail -4
    timeout 200 torchrun --nproc-per-node 2 scripts/profile_decode.py --model gpt-oss-120b --batch 1 64 --context 128 \
      --steps 16 2>&1 | grep -v "^|---\|Warning\|warn" | head -44
    timeout 120 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 256 --context 128 --steps 16 2>&1 \
      | grep -v "^|---\|Warning\|warn" | head -30
    ;;
  check)  # after a change to the engine: every GPU test, then where decode steps' time goes (20b, one GPU)
    timeout 330 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -x 2>&1 | tail -6
    CUDA_VISIBLE_DEVICES=0 timeout 150 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 256 --context 128 \
      --steps 16 2>&1 | grep -v "^|---\|Warning\|warn" | head -30
    ;;
  benches)  # the engine benchmark: gpt-oss-20b on one GPU (against transformers), gpt-oss-120b at tp=2 on two
    CUDA_VISIBLE_DEVICES=0 timeout 330 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda \
      "batch_sizes=[1,8,64,256]" "ttft_prompts=[8192,131072]" repeat=2 hf=true json=$OUT/bench20b.json 2>&1 | tail -14
    timeout 240 torchrun --nproc-per-node 2 -m launch.bench checkpoint=dummy model=gpt-oss-120b device=cuda \
      parallel.tp=2 "batch_sizes=[1,8,64,256]" "ttft_prompts=[8192,131072]" repeat=2 \
      json=$OUT/bench120b_tp2.json 2>&1 | grep -v Warning | tail -12
    ;;
  quick)  # a short check after kernel changes: their GPU tests, the graph tests, the dense GEMV bench, batch 1 and 8
    timeout 100 python3 -m pytest -q -m gpu tests/test_linear.py tests/test_router.py -p no:cacheprovider 2>&1 | tail -3
    timeout 150 python3 -m pytest -q tests/ -p no:cacheprovider -k "cuda_graph_decode or bf16_on_gpu" 2>&1 | tail -3
    timeout 60 python3 scripts/bench_linear.py 2>&1 | grep -v "^|---" | tail -12
    timeout 120 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda "batch_sizes=[1,8]" \
      "ttft_prompts=[]" repeat=3 2>&1 | tail -5
    ;;
  two-gpus-split)  # a two-GPU machine used as two: every GPU test on GPU 0 while GPU 1 runs the one-GPU 120b benchmark
    (CUDA_VISIBLE_DEVICES=1 timeout 560 bash -c "python3 scripts/profile_decode.py --model gpt-oss-120b --batch 1 \
      --context 1024 --steps 16 2>&1 | grep -v '^|---\|Warning\|warn' | head -24; python3 -m launch.bench checkpoint=dummy \
      model=gpt-oss-120b device=cuda 'batch_sizes=[1,8,64,256]' 'ttft_prompts=[8192,131072]' repeat=2 \
      json=$OUT/bench120b_one_gpu.json 2>&1 | tail -14" > $OUT/one_gpu_120b.log 2>&1) &
    CUDA_VISIBLE_DEVICES=0 timeout 540 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 \
      | grep -E "passed|failed|FAILED|Error" | tail -12
    wait
    cat $OUT/one_gpu_120b.log
    ;;
  graph-ab)  # one GPU: decode-graph GPU time a step (PDL off and on) of .carry/base (the commit before) and this
    # tree, alternately; where a step's time goes (PDL off); the router's GPU tests
    for tree in .carry/base $PWD .carry/base $PWD; do
      echo "tree $tree"
      (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 120 python3 scripts/profile_decode.py --model gpt-oss-20b \
        --batch 1 4 --context 128 --steps 8 --ab GPT_OSS_PDL 2>&1 | grep "replay")
    done
    GPT_OSS_PDL=0 timeout 100 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 --context 128 \
      --steps 16 2>&1 | grep -v "^|---\|Warning\|warn" | head -9
    timeout 150 python3 -m pytest -q -m gpu tests/test_router.py tests/ -p no:cacheprovider \
      -k "route or router or cuda_graph_decode or kv_cache" 2>&1 | tail -2
    ;;
  tiles-ab)  # one GPU: 20b decode with this tree's tiles against .carry/base (a worktree of the commit before),
    # alternately, then the GPU tests of the kernels whose tiles changed and of the whole model
    for tree in .carry/base $PWD .carry/base $PWD; do
      echo "tree $tree"
      (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b \
        device=cuda "batch_sizes=[1,4]" "ttft_prompts=[]" repeat=3 2>&1 | grep "decode tokens")
    done
    timeout 250 python3 -m pytest -q -m gpu tests/test_linear.py tests/ -p no:cacheprovider 2>&1 \
      | grep -E "passed|failed|FAILED|Error|assert" | tail -20
    ;;
  h100-final)  # one H100: where a batch-1 step's time goes (PDL off: each kernel's own time), then the
    # engine benchmark of 20b against transformers, up to a 131,072-token prompt
    GPT_OSS_PDL=0 timeout 100 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 --context 128 \
      --steps 16 2>&1 | grep -v "^|---\|Warning\|warn" | head -12
    timeout 460 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda "batch_sizes=[1,8,64,256]" \
      "ttft_prompts=[8192,32768,131072]" repeat=2 hf=true json=$OUT/bench20b_h100.json 2>&1 | tail -16
    ;;
  unroll-tp2)  # GPU 0: the dense GEMV's unrolled steps A/B, then 20b end to end; GPU 1 meanwhile: GPU tests of
    # the GEMV and the graphs; then both GPUs: the tp=2 graph test and 120b at tp=2 (the step plans over gloo)
    (CUDA_VISIBLE_DEVICES=1 timeout 300 python3 -m pytest -q -m gpu tests/test_linear.py tests/ \
      -p no:cacheprovider -k "not tensor_parallel" 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -20 \
      > $OUT/gpu_tests.log) &
    export CUDA_VISIBLE_DEVICES=0
    timeout 150 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 4 --context 128 --steps 8 \
      --ab GPT_OSS_GEMV_UNROLL 2>&1 | grep "replay\|GPU busy\|Error"
    timeout 60 python3 scripts/bench_linear.py --rows 1 2>&1 | grep -v "^|---" | tail -14
    timeout 200 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda \
      "batch_sizes=[1,4,8,64,256]" "ttft_prompts=[]" repeat=2 json=$OUT/bench20b.json 2>&1 | tail -8
    wait
    cat $OUT/gpu_tests.log
    unset CUDA_VISIBLE_DEVICES
    timeout 150 python3 -m pytest -q tests/ -p no:cacheprovider -k "tensor_parallel" 2>&1 | tail -3
    timeout 170 torchrun --nproc-per-node 2 -m launch.bench checkpoint=dummy model=gpt-oss-120b device=cuda \
      parallel.tp=2 "batch_sizes=[1,64]" "ttft_prompts=[]" repeat=2 2>&1 | grep -v Warning | tail -6
    ;;
  fusions-ab)  # every GPU test (GPU 1) while GPU 0 times 20b decode before (.carry/base: a worktree of the commit
    # before) and after this tree's changes, the fused QKV GEMV, and where a batch-1 step's time goes (PDL off)
    (CUDA_VISIBLE_DEVICES=1 timeout 400 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 \
      | grep -E "passed|failed|FAILED|Error|assert" | tail -30 > $OUT/gpu_tests.log) &
    export CUDA_VISIBLE_DEVICES=0
    for tree in .carry/base $PWD .carry/base $PWD; do
      echo "tree $tree"
      (cd $tree && PYTHONPATH=/tmp/site:$PWD timeout 100 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b \
        device=cuda "batch_sizes=[1,4]" "ttft_prompts=[]" repeat=3 2>&1 | grep "decode tokens")
    done
    timeout 60 python3 scripts/bench_linear.py 2>&1 | grep -v "^|---" | tail -8
    GPT_OSS_PDL=0 timeout 100 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 \
      --context 128 --steps 16 2>&1 | grep -v "^|---\|Warning\|warn" | head -20
    wait
    cat $OUT/gpu_tests.log
    ;;
  two-gpus-check)  # a two-GPU machine: every GPU test (GPU 1) while GPU 0 times 20b alone; then tp=2 (both GPUs)
    (CUDA_VISIBLE_DEVICES=1 timeout 330 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 \
      | grep -E "passed|failed|FAILED|Error" | tail -12 > $OUT/gpu_tests.log) &
    CUDA_VISIBLE_DEVICES=0 GPT_OSS_PDL=0 timeout 100 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 \
      --context 128 --steps 16 2>&1 | grep -v "^|---\|Warning\|warn" | head -22
    CUDA_VISIBLE_DEVICES=0 timeout 200 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda \
      "batch_sizes=[1,4,8,64,256]" "ttft_prompts=[]" repeat=2 json=$OUT/bench20b.json 2>&1 | tail -9
    wait
    cat $OUT/gpu_tests.log
    timeout 150 python3 -m pytest -q tests/ -p no:cacheprovider -k "tensor_parallel" 2>&1 | tail -3
    timeout 170 torchrun --nproc-per-node 2 -m launch.bench checkpoint=dummy model=gpt-oss-120b device=cuda \
      parallel.tp=2 "batch_sizes=[1,64]" "ttft_prompts=[]" repeat=2 2>&1 | grep -v Warning | tail -6
    ;;
  bench120b-tp2)  # gpt-oss-120b over two GPUs (tp=2): the engine benchmark, up to a 131,072-token prompt
    timeout 570 torchrun --nproc-per-node 2 -m launch.bench checkpoint=dummy model=gpt-oss-120b device=cuda \
      parallel.tp=2 "batch_sizes=[1,8,64,256]" "ttft_prompts=[8192,32768,131072]" repeat=2 \
      json=$OUT/bench120b_tp2.json 2>&1 | grep -v Warning | tail -16
    ;;
  pdl)  # programmatic dependent launch: batch 1/8/64 with it off and on (same machine), the batch-1 profile, GPU tests
    python3 -c "import triton; from runtime.kernels import pdl; import torch; print('triton', triton.__version__, 'pdl', pdl.enabled(torch.device('cuda', 0)))"
    for flag in 0 1 0 1; do
      echo "GPT_OSS_PDL=$flag"
      GPT_OSS_PDL=$flag timeout 110 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b device=cuda \
        "batch_sizes=[1,8,64]" "ttft_prompts=[]" repeat=3 2>&1 | grep "decode" | head -3
    done
    timeout 100 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 --context 128 --steps 16 2>&1 \
      | grep -v "^|---\|Warning\|warn" | head -24
    timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -x 2>&1 | tail -4
    ;;
  mma-gemv)  # the MoE's one-row GEMV on tensor cores: decode-step A/B, per-GEMM A/B, its GPU tests, then a tile sweep
    timeout 150 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 1 4 --context 128 --steps 8 \
      --ab GPT_OSS_MOE_MMA_GEMV 2>&1 | grep "replay\|GPU busy\|Error"
    for flag in 0 1; do
      GPT_OSS_MOE_MMA_GEMV=$flag timeout 60 python3 scripts/bench_moe.py --model gpt-oss-20b --tokens 1 4 2>&1 | grep "gemm"
    done
    timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -x -k \
      "tensor_cores or triton_experts or scale_ranges or kv_cache_decode or replays_the_static or programmatic" 2>&1 | tail -3
    timeout 150 python3 scripts/bench_moe.py --model gpt-oss-20b --sweep --tokens 1 2>&1 | grep "best gemv\|FASTEST"
    ;;
  attention)  # attention: its GPU tests, every case graph-timed, then the prefill tile sweep (full layers)
    timeout 150 python3 -m pytest -q -m gpu tests/test_attention.py -p no:cacheprovider 2>&1 | tail -2
    timeout 120 python3 scripts/bench_attention.py 2>&1 | tail -16
    timeout 300 python3 scripts/bench_attention.py --sweep --cases "prefill 4096 full" "prefill 16384 full" 2>&1 \
      | grep -v "^    [ 0-9.]* us  {" | tail -14
    ;;
  attention-decode)  # the decode split/tile sweep at 32k and 131k (full layers)
    timeout 280 python3 scripts/bench_attention.py --sweep --cases "ctx 32k full" "ctx 128k full" 2>&1 \
      | grep -v "^    [ 0-9.]* us  {" | tail -12
    ;;
  mma-rows)  # the MoE's multi-row tensor-core GEMV: its GPU tests, decode-step A/B (20b batch 4/8/64), per-GEMM
    # sweep at 8 and 64 tokens of 20b and 64 of 120b
    timeout 200 python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -k \
      "multi_row or tensor_cores or triton_experts or scale_ranges" 2>&1 | grep -E "passed|failed|FAILED|Error|assert" | tail -8
    timeout 200 python3 scripts/profile_decode.py --model gpt-oss-20b --batch 4 8 64 --context 128 --steps 8 \
      --ab GPT_OSS_MOE_MMA_ROWS 2>&1 | grep "replay\|Error"
    timeout 280 python3 scripts/bench_moe.py --model gpt-oss-20b gpt-oss-120b --sweep --routes mma_rows --rep 40 \
      --tokens 8 64 2>&1 \
      | grep "best\|FASTEST\|WRONG\|Error\|tokens .* gemm"
    ;;
  moe)
    python3 -m pytest -q -m gpu tests/ -p no:cacheprovider -k "triton_experts" 2>&1 | tail -6
    python3 scripts/bench_moe.py --model gpt-oss-20b --sweep --tokens 1 8 64 4096
    python3 scripts/bench_moe.py --model gpt-oss-120b --tokens 1 64 4096
    python3 scripts/baseline_bench.py --model gpt-oss-20b --batch 1 64 --json $OUT/e2e.json 2>&1 | tail -4
    ;;
  all)
    python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | grep -E "passed|failed|FAILED|Error" | tail -12
    python3 scripts/bench_kernels.py --json $OUT/kernels.json 2>&1 | tail -60
    python3 scripts/baseline_bench.py --model gpt-oss-20b --batch 1 64 --hf --json $OUT/e2e.json 2>&1 | tail -5
    ;;
esac
