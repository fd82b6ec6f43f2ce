#!/usr/bin/env bash
# The scaling issue's benchmark on one multi-GPU machine (docs/performance.md, "Scaling over GPUs"),
# in parts that each fit a device call; logs and JSON under $OUT, a table at the end of each part:
#   decode [MODEL] [TPS]: batch-1 decode at tp = TPS (default "1 2 4 8", as many as the machine has;
#                       from tp=4 the experts are partitioned whole, parallel.expert_tp=1: 2880 splits
#                       2 ways, not 4), from tp=2 each also with the one-shot all-reduce
#                       (GPT_OSS_PEER_ALL_REDUCE=1); a call fits about four runs, so on 8 GPUs:
#                       decode MODEL "1 2", then decode MODEL "4 8"
#   decode-ep [MODEL]:  batch-1 decode at ep=2, NCCL and the one-shot all-reduce
#   throughput [MODEL] [REQUESTS]: 1k/1k output tokens/s per GPU over all the machine's GPUs: dp
#                       replicas, tp=2 replicas, and attention_dp with ep = 2, 4, 8
#   a2a:                one MoE layer's exchange (host-sized and fixed-capacity) against NCCL's own
#                       all_to_all_single, at ep = 2, 4, 8 (scripts/parallel_bench.py --a2a)
#   all-reduce:         tp's all-reduce of 1-128 rows, NCCL against the one-shot through peer memory,
#                       eager and in graphs, at tp = 2, 4, 8 (scripts/parallel_bench.py --all-reduce)
#   table:              the table of every JSON under $OUT
set -uo pipefail
source scripts/device_env.sh
mkdir -p "$OUT"
gpus=$(nvidia-smi -L | wc -l)
what=${1:-table}; shift || true

run() {  # name ranks args...: one torchrun job of launch.bench, its JSON kept
  local name=$1 ranks=$2; shift 2
  timeout 560 torchrun --nproc-per-node "$ranks" -m launch.bench checkpoint=dummy device=cuda \
    json="$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 || echo "$name failed: $(tail -1 "$OUT/$name.log")"
}

case "$what" in
  decode)
    model=${1:-gpt-oss-120b}
    for tp in ${2:-1 2 4 8}; do
      [ "$tp" -le "$gpus" ] || continue
      split=$([ "$tp" -ge 4 ] && echo "parallel.expert_tp=1" || echo "")
      args=(model="$model" "batch_sizes=[1]" "ttft_prompts=[]" decode_tokens=128 max_batch_size=8
            parallel.tp="$tp" $split)
      run "decode_${model}_tp$tp" "$tp" "${args[@]}"
      [ "$tp" -gt 1 ] && GPT_OSS_PEER_ALL_REDUCE=1 run "decode_${model}_tp${tp}_peer" "$tp" "${args[@]}"
    done
    ;;
  decode-ep)  # the issue's "ep=2 at least one GPU's rate": one all-reduce a layer
    model=${1:-gpt-oss-120b}
    args=(model="$model" "batch_sizes=[1]" "ttft_prompts=[]" decode_tokens=128 max_batch_size=8 parallel.ep=2)
    run "decode_${model}_ep2" 2 "${args[@]}"
    GPT_OSS_PEER_ALL_REDUCE=1 run "decode_${model}_ep2_peer" 2 "${args[@]}"
    ;;
  throughput)
    model=${1:-gpt-oss-120b}; requests=${2:-1024}
    common=(model="$model" mode=throughput preset=1k1k requests="$requests")
    run "throughput_${model}_dp$gpus" "$gpus" "${common[@]}"
    [ "$gpus" -ge 2 ] && run "throughput_${model}_tp2" "$gpus" "${common[@]}" parallel.tp=2
    for ep in 2 4 8; do
      [ "$ep" -le "$gpus" ] || continue
      run "throughput_${model}_adp_ep$ep" "$gpus" "${common[@]}" parallel.ep="$ep" parallel.attention_dp=true
    done
    ;;
  a2a)
    for ep in 2 4 8; do
      [ "$ep" -le "$gpus" ] || continue
      timeout 400 torchrun --nproc-per-node "$ep" scripts/parallel_bench.py --model gpt-oss-120b --ep "$ep" \
        --batch 1 --a2a --json "$OUT/a2a_ep$ep.json" > "$OUT/a2a_ep$ep.log" 2>&1 \
        || echo "a2a ep=$ep failed: $(tail -1 "$OUT/a2a_ep$ep.log")"
    done
    ;;
  all-reduce)
    for tp in 2 4 8; do
      [ "$tp" -le "$gpus" ] || continue
      timeout 300 torchrun --nproc-per-node "$tp" scripts/parallel_bench.py --tp "$tp" --all-reduce --no-model \
        --json "$OUT/all_reduce_tp$tp.json" > "$OUT/all_reduce_tp$tp.log" 2>&1 \
        || echo "all-reduce tp=$tp failed: $(tail -1 "$OUT/all_reduce_tp$tp.log")"
    done
    ;;
esac

python3 - "$OUT" <<'PY'
import glob, json, os, sys
rows = []
for path in sorted(glob.glob(os.path.join(sys.argv[1], "*.json"))):
    name, r = os.path.basename(path)[:-5], json.load(open(path))
    if r.get("mode") == "throughput":
        rows.append(f"| {name} | {r['gpus']} GPU(s) a scheduler | output tokens/s per GPU "
                    f"{r['output_tokens_per_s_per_gpu']:,.0f} | mean batch {r['mean_running_batch']:,.0f}, "
                    f"preemptions {r['preemptions']:,} |")
    elif "rows" in r:
        decode = next((x for x in r["rows"] if x["kind"] == "decode" and x["batch"] == 1), None)
        if decode:
            rows.append(f"| {name} | {r['layout']} | batch-1 decode {decode['tokens_per_s']:,.1f} tok/s | |")
    elif "all_to_all" in r:
        for x in r["all_to_all"]:
            what = (f"{x['path']} {x['tokens_per_rank']} tokens a rank: {x['ms']:.3f} ms"
                    if "path" in x else f"NCCL all_to_all_single 256 MB: {x['nccl_all_to_all_256MB_ms']:.2f} ms")
            rows.append(f"| {name} | {r['layout']} | {what} | {x['GBps']:.1f} GB/s |")
    for x in r.get("all_reduce", []):
        rows.append(f"| {name} | {r['layout']} | all-reduce {x['dtype']} {x['rows']} rows, {x['path']}: "
                    f"{x['eager_us']:.1f} us eager, {x['graph_us']:.1f} us in a graph | same on every rank "
                    f"{x['same_on_every_rank']}, off NCCL by {x['max_abs_diff_vs_nccl']:.3g} |")
print("| run | layout | measurement | |\n|---|---|---|---|\n" + "\n".join(rows))
PY
