"""launch.bench on the tiny model (CPU): every measurement present, positive, and in the table."""

import json
import subprocess
import sys


def test_bench_runs_and_reports_every_measurement(tiny_checkpoints, tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "launch.bench", f"checkpoint={tiny_checkpoints['original']}",
                           "device=cpu", "batch_sizes=[1,3]", "ttft_prompts=[40]", "prompt_tokens=12",
                           "decode_tokens=3", "repeat=1", "kv_cache_tokens=256", f"json={out}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(out.read_text())
    kinds = [(r["kind"], r.get("batch"), r.get("prompt")) for r in report["rows"]]
    assert kinds == [("decode", 1, None), ("decode", 3, None), ("ttft", None, 40)]
    # Decode rates come from a difference of two timings: nan (never negative) when noise swamps it.
    assert all(not r.get("tokens_per_s", 1) <= 0 and r["prefill_tokens_per_s"] > 0 for r in report["rows"])
    assert report["kv_cache_tokens"] == 256 and report["device"] == "cpu"
    for line in ("decode tokens/s, batch 3", "time to first token, 40-token prompt"):
        assert line in proc.stdout
