"""Ray offline batch inference on a local Ray on CPU: a 2-rank replica (gloo inside the actors)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("ray")
pyarrow_parquet = pytest.importorskip("pyarrow.parquet")

REPO = Path(__file__).resolve().parents[1]
REQUESTS = [{"id": i, "prompt_token_ids": [500 + i, 600 + i, 700 + i, 800 + i][: 2 + i % 3], "max_tokens": 5,
             "temperature": 0, "logprobs": True} for i in range(6)]
REQUESTS.append({"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4,
                 "temperature": 0})
# OpenAI Batch lines beside the native ones (runtime/openai_batch.py), one of them bad
REQUESTS += [{"custom_id": "openai-chat", "method": "POST", "url": "/v1/chat/completions",
              "body": {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "temperature": 0}},
             {"custom_id": "openai-text", "method": "POST", "url": "/v1/completions",
              "body": {"prompt": "Hello", "max_tokens": 3, "temperature": 0, "logprobs": 1}},
             {"custom_id": "openai-bad", "method": "POST", "url": "/v1/completions", "body": {"n": 3}}]


def run(*args, module="launch.ray_batch"):
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    return done.stderr


def by_id(path):
    """Native results by id (or line), OpenAI Batch results by custom_id, the latter without the time
    their completion was made."""
    rows = {}
    for r in map(json.loads, path.read_text().splitlines()):
        if "custom_id" in r:
            r["response"]["body"].pop("created", None)
            rows[r["custom_id"]] = r
        else:
            rows[r["id"] if r["id"] is not None else f"line {r['line']}"] = r
    return rows


def close(a, b, tol=1e-4) -> bool:
    """Equal JSON values, floats (logprobs: two ranks sum in another order) within tol."""
    if isinstance(a, float) and isinstance(b, float):
        return abs(a - b) <= tol
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(close(a[k], b[k], tol) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(close(x, y, tol) for x, y in zip(a, b))
    return a == b


def test_two_rank_replica_matches_one_process_and_resumes(tiny_checkpoints, tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text("".join(json.dumps(r) + "\n" for r in REQUESTS) + "{not json\n")
    ckpt = f"checkpoint={tiny_checkpoints['original']}"
    run(ckpt, f"input={inp}", f"output={tmp_path / 'single.jsonl'}", "progress=false", module="launch.batch")
    out = tmp_path / "ray.jsonl"
    log = run(ckpt, f"input={inp}", f"output={out}", "parallel.tp=2", "ray_num_cpus=4", "ray_batch_size=4")
    expected, got = by_id(tmp_path / "single.jsonl"), by_id(out)
    assert sorted(got, key=str) == sorted(expected, key=str)
    assert [got[rid]["response"]["status_code"] for rid in ("openai-chat", "openai-text", "openai-bad")] == \
        [200, 200, 400]
    for rid in ("openai-chat", "openai-text", "openai-bad"):
        assert close(got.pop(rid), expected.pop(rid)), rid
    for rid, want in expected.items():
        assert (got[rid]["token_ids"] == want["token_ids"]
                and got[rid]["finish_reason"] == want["finish_reason"])
        if "logprobs" in want:
            assert max(abs(a - b) for a, b in zip(got[rid]["logprobs"], want["logprobs"])) < 1e-4
    assert "not valid JSON" in got["line 11"]["error"] and "channels" in got["chat"]
    assert "rank 1: loaded" in log  # two ranks formed the replica
    before = out.read_text()
    log = run(ckpt, f"input={inp}", f"output={out}", "ray_num_cpus=4")
    assert "done: 0 requests (11 already done)" in log
    assert out.read_text() == before


def test_parquet_in_parquet_out_with_two_replicas(tiny_checkpoints, tmp_path):
    import pyarrow as pa

    inp = tmp_path / "in.parquet"
    rows = [{"id": str(i), "prompt": f"request {i}", "max_tokens": 3, "temperature": 0.0} for i in range(6)]
    rows.append({"custom_id": "openai", "method": "POST", "url": "/v1/completions",  # an OpenAI Batch row
                 "body": {"prompt": "x", "max_tokens": 2, "temperature": 0.0}})
    columns = {key: None for row in rows for key in row}  # every row's columns (null where it has none)
    pyarrow_parquet.write_table(pa.Table.from_pylist([{**columns, **row} for row in rows]), inp)
    out = tmp_path / "out.parquet"
    run(f"checkpoint={tiny_checkpoints['original']}", f"input={inp}", f"output={out}", "replicas=2",
        "ray_num_cpus=4", "ray_batch_size=2")
    table = pyarrow_parquet.read_table(out).to_pylist()
    [openai] = [r for r in table if r["custom_id"] == "openai"]
    body = json.loads(openai["response"])["body"]
    assert body["object"] == "text_completion" and body["usage"]["completion_tokens"] == 2
    table.remove(openai)
    assert sorted(r["id"] for r in table) == [str(i) for i in range(6)]
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 3 for r in table)


def test_attention_data_parallelism_is_refused_before_ray_starts(tmp_path, capsys):
    """The Ray job schedules a replica's requests on its first actor: parallel.attention_dp (each rank
    its own requests) is for launch.batch, and says so before any actor starts."""
    from launch import ray_batch
    from batch_jobs import config

    inp = tmp_path / "in.jsonl"
    inp.write_text('{"id": 0, "prompt": "x"}\n')
    cfg = config("ray_batch", input=inp, output=tmp_path / "out.jsonl", **{"parallel.ep": 2,
                                                                          "parallel.attention_dp": True})
    with pytest.raises(SystemExit) as e:
        ray_batch.run(cfg)
    assert e.value.code == 2
    assert "parallel.attention_dp is for launch.batch" in capsys.readouterr().err
