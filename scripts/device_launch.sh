#!/usr/bin/env bash
# The launch issue's device check on 2 GPUs: the same requests through one GPU (python -m launch.batch),
# two torchrun data-parallel replicas, and one Ray replica with tp=2 must give identical outputs;
# each run's tokens/s is printed. Dummy gpt-oss-20b in float32 (so the comparison is exact up to
# float32 summation order; bf16 would differ by rounding between layouts).
set -euo pipefail
source scripts/device_env.sh
export RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0
nvidia-smi -L
python3 - <<'PY'
import json, random
random.seed(0)
with open("/tmp/launch.jsonl", "w") as f:
    for i in range(32):
        f.write(json.dumps({"id": i, "prompt_token_ids": [random.randrange(199998) for _ in range(48)],
                            "max_tokens": 16, "temperature": 0, "ignore_eos": True, "logprobs": True}) + "\n")
PY
common="checkpoint=dummy model=gpt-oss-20b dtype=float32 input=/tmp/launch.jsonl progress=false"
CUDA_VISIBLE_DEVICES=0 python3 -m launch.batch $common device=cuda output=$OUT/one_gpu.jsonl 2>&1 | grep "done:"
torchrun --nproc-per-node 2 -m launch.batch $common device=cuda output=$OUT/torchrun_dp2.jsonl 2>&1 | grep "done:"
python3 -m launch.ray_batch $common device=cuda output=$OUT/ray_tp2.jsonl parallel.tp=2 replicas=1 2>&1 \
  | grep "done:\|rank .: loaded\|Error\|error" | head -20
python3 - $OUT <<'PY'
import json, sys
load = lambda name: {r["id"]: r for r in map(json.loads, open(f"{sys.argv[1]}/{name}.jsonl"))}
one = load("one_gpu")
for name in ("torchrun_dp2", "ray_tp2"):
    other = load(name)
    same = one.keys() == other.keys() and all(one[k]["token_ids"] == other[k]["token_ids"] for k in one)
    err = max(abs(a - b) for k in one for a, b in zip(one[k]["logprobs"], other[k]["logprobs"]))
    print(f"IDENTICAL {name:<14} ids+tokens: {same}, max |logprob diff| {err:.2e}, {len(other)} results")
PY
