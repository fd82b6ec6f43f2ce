#!/usr/bin/env bash
# The foundation issue's GPU checks and baseline numbers, in one device call:
#   GPU tests, the batch job on CUDA/bf16 (tiny checkpoint and dummy gpt-oss-20b), baseline tokens/s.
# On the lent machine: wheels for what its image lacks come in .whl/, the vocab in .carry/tiktoken/.
set -euo pipefail
source scripts/device_env.sh
nvidia-smi -L
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"

echo "== GPU tests"
status=0
python3 -m pytest -q -s -m gpu tests/ -p no:cacheprovider 2>&1 | tee $OUT/pytest_gpu.log || status=1

echo "== batch job on CUDA, bf16"
python3 - <<'PY'
import json, random
random.seed(0)
with open("/tmp/in.jsonl", "w") as f:
    for i in range(16):
        f.write(json.dumps({"id": i, "prompt_token_ids": [random.randrange(199998) for _ in range(64)],
                            "max_tokens": 32, "temperature": 0, "ignore_eos": True}) + "\n")
    f.write(json.dumps({"id": "chat", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 16}) + "\n")
    f.write("{not json\n")
PY
python3 -m launch.batch device=cuda dtype=bfloat16 input=/tmp/in.jsonl output=$OUT/tiny_out.jsonl progress=false 2>&1 | tail -2
python3 -m launch.batch checkpoint=dummy model=gpt-oss-20b device=cuda dtype=bfloat16 input=/tmp/in.jsonl \
  output=$OUT/20b_out.jsonl progress=false 2>&1 | tail -2
python3 -c "
import json
for name in ('tiny', '20b'):
    rows = [json.loads(l) for l in open('$OUT/' + name + '_out.jsonl')]
    print(name, len(rows), 'lines;', sum(r['finish_reason'] == 'error' for r in rows), 'errors;', sum(len(r['token_ids']) for r in rows), 'tokens')
"

echo "== baseline speed (reference path)"
python3 scripts/baseline_bench.py --model tiny --batch 1 64 --json $OUT/bench_tiny.json
python3 scripts/baseline_bench.py --model gpt-oss-20b --batch 1 64 --json $OUT/bench_20b.json
exit $status
