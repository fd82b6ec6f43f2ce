"""launch.bench on the tiny model (CPU): every measurement present, positive, and in the table."""

import json
import subprocess
import sys

import pytest


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


def test_throughput_mode_counts_every_token_of_the_batch(tiny_checkpoints, tmp_path):
    """mode=throughput: exactly ISL prompt and OSL output tokens a request, every request, the step
    counts of the timed run alone (the warm-up apart), and a bad preset refused before loading."""
    out = tmp_path / "throughput.json"
    proc = subprocess.run([sys.executable, "-m", "launch.bench", "mode=throughput",
                           f"checkpoint={tiny_checkpoints['original']}", "device=cpu", "isl=24", "osl=5",
                           "requests=10", "max_batch_size=4", "max_batch_tokens=32", f"json={out}"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    r = json.loads(out.read_text())
    assert r["workload"] == {"kind": "random", "isl": 24, "osl": 5, "requests": 10, "preset": None,
                             "prefix": 0}
    assert (r["requests"], r["prompt_tokens"], r["output_tokens"]) == (10, 240, 50)
    assert r["output_tokens_per_s_per_gpu"] * r["seconds"] == pytest.approx(50)
    # 10 requests through a batch of 4: prompts of 24 tokens in a 32-token budget take >= 8 steps,
    # the 40 decodes after the first tokens >= 10 more; the batch is full most of the time.
    assert r["steps"] >= 18 and 2 < r["mean_running_batch"] <= 4 and r["graph_steps"] == 0
    assert r["startup"]["warmup_requests"] == 3  # 32 // 24 + 2: one step's budget of prompts
    assert r["startup"]["graph_warm_ups"] == {}  # no graphs on a CPU
    none = {"count": 0, "seconds": 0.0, "kernels": {}, "seconds_by_kernel": {}}  # the reference path
    assert r["timed_run_compiles"] == none and r["startup"]["graph_compiles"] == none
    assert "| Triton compiles inside the timed run | 0 (0.0 s) |" in proc.stdout
    assert "output tokens/s per GPU" in proc.stdout and "mean running batch" in proc.stdout
    bad = subprocess.run([sys.executable, "-m", "launch.bench", "mode=throughput", "preset=2k2k"],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "preset=2k2k is not one of 1k1k" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_the_compiling_ahead_row_names_each_kind_of_graph_and_a_dry_pass_that_stopped():
    from launch.throughput import ahead_line

    warm_ups = {"decode": {"wall_s": 9.0, "ahead": {"kernels": 61, "failed": 0, "dry_s": 0.52,
                                                    "compile_s": 4.44, "error": None}},
                "mixed": {"wall_s": 1.0, "ahead": {"kernels": 3, "failed": 1, "dry_s": 0.1, "compile_s": 0.9,
                                                   "error": "RuntimeError: not capturable"}},
                "eager": {"wall_s": 0.5}}
    assert ahead_line(warm_ups) == ("| start-up: Triton kernels compiled ahead | decode: 61 kernels in 4.4 s "
                                    "after a 0.5 s dry pass; mixed: 3 kernels, 1 failed in 0.9 s after a "
                                    "0.1 s dry pass; dry pass stopped: RuntimeError: not capturable | | |")


def test_the_compute_limit_counts_attention_at_each_position():
    """launch/limits.py's FLOPs against a count key by key, layer by layer (the sliding window and
    the positions past it included)."""
    from launch.limits import attention_score_flops, flops_per_token, head_flops, sequence_flops
    from runtime.config import preset

    cfg = preset("tiny")
    per_key = 4 * cfg.num_attention_heads * cfg.head_dim
    for start, end in ((0, 1), (0, 5), (3, 300), (cfg.sliding_window - 1, cfg.sliding_window + 2)):
        keys = sum(min(p + 1, cfg.sliding_window) if cfg.is_sliding(n) else p + 1
                   for p in range(start, end) for n in range(cfg.num_hidden_layers))
        assert attention_score_flops(cfg, start, end) == per_key * keys
    # a 10-token prompt and 3 generated: 12 positions through the layers, 3 rows through the head
    assert sequence_flops(cfg, 10, 3) == (12 * flops_per_token(cfg) + attention_score_flops(cfg, 0, 12)
                                          + 3 * head_flops(cfg))
