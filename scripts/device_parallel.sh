#!/usr/bin/env bash
# The parallel issue's device checks on 2 GPUs (NCCL):
#   part "equivalence+layouts": the batch job under torchrun (tp=2, ep=2, tp=2 with whole experts
#     over both ranks) gives the one-GPU answer in float32, then dummy gpt-oss-120b with tp=2 and ep=2;
#   part "single": the one-GPU gpt-oss-120b baseline and the GPU tests.
set -euo pipefail
source scripts/device_env.sh
part=${1:-all}
nvidia-smi -L
if [[ $part == all || $part == layouts ]]; then
  nvidia-smi topo -m || true
  python3 - <<'PY'
import json, random
random.seed(0)
with open("/tmp/eq.jsonl", "w") as f:
    for i in range(8):
        f.write(json.dumps({"id": i, "prompt_token_ids": [random.randrange(199998) for _ in range(5 + 4 * i)],
                            "max_tokens": 12, "temperature": 0, "logprobs": True}) + "\n")
    f.write(json.dumps({"id": "s", "prompt": "Once upon a time", "max_tokens": 12, "temperature": 0.9,
                        "seed": 5, "logprobs": True}) + "\n")
PY
  common="input=/tmp/eq.jsonl device=cuda dtype=float32 progress=false"
  python3 -m launch.batch $common output=/tmp/eq_1.jsonl
  for layout in "parallel.tp=2" "parallel.ep=2" "parallel.tp=2 parallel.expert_tp=1"; do
    name=$(echo "$layout" | tr ' =.' '___')
    torchrun --nproc-per-node 2 -m launch.batch $common output=/tmp/eq_$name.jsonl $layout 2>&1 | grep -v Warning | tail -3
    python3 - /tmp/eq_1.jsonl /tmp/eq_$name.jsonl "$layout" <<'PY'
import json, sys
load = lambda p: {r["id"]: r for r in map(json.loads, open(p))}
a, b = load(sys.argv[1]), load(sys.argv[2])
same = all(a[k]["token_ids"] == b[k]["token_ids"] for k in a) and a.keys() == b.keys()
err = max(abs(x - y) for k in a for x, y in zip(a[k]["logprobs"], b[k]["logprobs"]))
print(f"EQUIVALENCE {sys.argv[3]:<35} same tokens: {same}, max |logprob diff|: {err:.2e}")
PY
  done
fi
if [[ $part == all || $part == layouts || $part == bench* ]]; then
  if [[ $part != bench-ep ]]; then
    torchrun --nproc-per-node 2 scripts/parallel_bench.py --model gpt-oss-120b --tp 2 --json $OUT/120b_tp2.json > $OUT/tp2.log 2>&1 || true
    grep -v Warning $OUT/tp2.log | tail -4
  fi
  torchrun --nproc-per-node 2 scripts/parallel_bench.py --model gpt-oss-120b --ep 2 --a2a --json $OUT/120b_ep2.json > $OUT/ep2.log 2>&1 || true
  grep -v Warning $OUT/ep2.log | grep -v "^ \|^\[" | tail -12
fi
if [[ $part == all || $part == single || $part == bench-ep ]]; then
  CUDA_VISIBLE_DEVICES=0 python3 scripts/parallel_bench.py --model gpt-oss-120b --json $OUT/120b_1gpu.json | tail -2
  python3 -m pytest -q -m gpu tests/ -p no:cacheprovider 2>&1 | tail -3
fi
if [[ $part == load ]]; then
  # Load time and memory per GPU from a real-format checkpoint on local disk (synthetic gpt-oss-20b,
  # HF layout, 13 GB), and the dummy 120b fill, per layout.
  time python3 -m launch.make_checkpoint model=gpt-oss-20b layout=hf out=/tmp/ck20
  quick="--batch 1 --decode 1 --repeat 1"
  python3 scripts/parallel_bench.py --model gpt-oss-20b --checkpoint /tmp/ck20 $quick | tail -1
  for layout in "--tp 2" "--ep 2"; do
    torchrun --nproc-per-node 2 scripts/parallel_bench.py --model gpt-oss-20b --checkpoint /tmp/ck20 $layout $quick 2>&1 | grep "tok/s"
  done
  python3 scripts/parallel_bench.py --model gpt-oss-120b $quick | tail -1
  for layout in "--tp 2" "--ep 2"; do
    torchrun --nproc-per-node 2 scripts/parallel_bench.py --model gpt-oss-120b $layout $quick 2>&1 | grep "tok/s"
  done
fi
