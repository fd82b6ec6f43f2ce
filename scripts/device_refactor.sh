#!/usr/bin/env bash
# The "one place for each decision" issue's device runs (docs/performance.md, "The refactor, measured"):
#   tests: every GPU test, the bit-exactness ones (graph replay, programmatic dependent launch) first;
#   ab:    dummy gpt-oss-20b on two trees alternately, `.base/` (main before the change, carried) and
#          this one: the decode step's GPU time (scripts/profile_decode.py --batch 1 64) and
#          launch.bench at batch 1 and 64; logs under $OUT, a table last.
set -uo pipefail
source scripts/device_env.sh
nvidia-smi -L
case "${1:-tests}" in
  tests)
    timeout 180 python3 -m pytest -v -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee $OUT/pytest_graphs.log | grep -E "PASSED|FAILED|SKIPPED|ERROR| passed| failed"
    timeout 370 python3 -m pytest -v -p no:cacheprovider -m gpu tests/ --ignore tests/test_cuda_graphs.py 2>&1 \
      | tee $OUT/pytest_gpu.log | grep -E "FAILED|ERROR| passed| failed" | tail -12; grep -c PASSED $OUT/pytest_gpu.log
    ;;
  ab)
    rounds=${2:-2}
    for round in $(seq "$rounds"); do
      for tree in .base .; do
        name=$([ "$tree" = . ] && echo new || echo base)
        (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 scripts/profile_decode.py --batch 1 64 --steps 32) \
          > "$OUT/profile_${name}_$round.log" 2>&1
        (cd "$tree" && PYTHONPATH=/tmp/site:$PWD timeout 150 python3 -m launch.bench checkpoint=dummy model=gpt-oss-20b \
          device=cuda "batch_sizes=[1,64]" "ttft_prompts=[]" decode_tokens=128 repeat=3 json="$OUT/bench_${name}_$round.json") \
          > "$OUT/bench_${name}_$round.log" 2>&1
        echo "round $round $name: $(grep -h 'GPU busy' "$OUT/profile_${name}_$round.log" | sed 's/:.*GPU busy/: GPU busy/' | cut -c1-60 | tr '\n' ';')"
      done
    done
    python3 - "$OUT" <<'PY'
import glob, json, re, statistics, sys
out = sys.argv[1]
rows = {}
for path in sorted(glob.glob(f"{out}/bench_*_*.json")):
    name = path.split("bench_")[1].split("_")[0]
    for r in json.load(open(path))["rows"]:
        if r["kind"] == "decode":
            rows.setdefault((name, f"bench batch {r['batch']} tok/s"), []).append(r["tokens_per_s"])
for path in sorted(glob.glob(f"{out}/profile_*_*.log")):
    name = path.split("profile_")[1].split("_")[0]
    for batch, us in re.findall(r"batch (\d+) context \d+: GPU busy ([\d,]+) us", open(path).read()):
        rows.setdefault((name, f"decode step GPU us, batch {batch}"), []).append(float(us.replace(",", "")))
print("| measure | base (runs) | new (runs) | new / base (medians) |\n|---|---|---|---:|")
for what in sorted({w for _, w in rows}):
    base, new = rows.get(("base", what), []), rows.get(("new", what), [])
    ratio = statistics.median(new) / statistics.median(base) if base and new else float("nan")
    print(f"| {what} | {', '.join(f'{v:,.1f}' for v in base)} | {', '.join(f'{v:,.1f}' for v in new)} | {ratio:.4f} |")
PY
    ;;
esac
