"""The offline batch job end to end: bad requests fail alone, bad checkpoints stop the job, reruns resume."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from safetensors.torch import load_file, save_file

from batch_jobs import EchoLLM, config
from launch import batch, ray_batch

REPO = Path(__file__).resolve().parents[1]


def write_lines(path, lines):
    path.write_text("".join((l if isinstance(l, str) else json.dumps(l)) + "\n" for l in lines))


def read_output(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


GOOD = [
    {"id": "tokens", "prompt_token_ids": [200006, 1428, 200008, 13225, 200007], "max_tokens": 5,
     "temperature": 0, "logprobs": True},
    {"id": "chat", "messages": [{"role": "user", "content": "Hi"}], "reasoning_effort": "high",
     "max_tokens": 6, "temperature": 0},
    {"id": 7, "prompt": "The capital of France is", "max_tokens": 4, "seed": 3},
]
BAD = [
    '{"id": "broken", "prompt": ',
    {"id": "unknown-field", "prompt": "x", "max_tokns": 4},
    {"id": "too-long", "prompt_token_ids": list(range(100)), "max_tokens": 4},
    {"id": "negative", "prompt": "x", "max_tokens": -1},
    {"prompt": "no id"},
]


def test_bad_requests_fail_alone(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, GOOD[:1] + BAD[:3] + GOOD[1:] + BAD[3:])
    stats = batch.run(config("batch", checkpoint=tiny_checkpoints["original"], input=inp, output=out,
                             max_model_len=64, progress=False))
    rows = read_output(out)
    by_id = {r["id"] if r["id"] is not None else f"line {r['line']}": r for r in rows}
    assert len(rows) == len(GOOD) + len(BAD) and stats["errors"] == len(BAD)
    for good in GOOD:
        r = by_id[good["id"]]
        assert r["finish_reason"] in ("stop", "length") and "error" not in r
        assert 1 <= len(r["token_ids"]) <= good["max_tokens"]
    assert len(by_id["tokens"]["logprobs"]) == len(by_id["tokens"]["token_ids"])
    assert "channels" in by_id["chat"] and "messages" in by_id["chat"]
    assert "logprobs" not in by_id[7]
    # A line without a usable id (unparseable, or no id field) is reported by its line number.
    expected = {"line 2": "not valid JSON", "unknown-field": "max_tokns", "too-long": "context limit",
                "negative": "max_tokens", "line 8": "'id'"}
    for rid, words in expected.items():
        assert by_id[rid]["finish_reason"] == "error" and words in by_id[rid]["error"], by_id[rid]
    assert by_id["line 2"]["error"].startswith("line 2:")


def test_rerun_resumes_without_repeating(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    reqs = [{"id": i, "prompt_token_ids": [100 + i, 200 + i, 300 + i], "max_tokens": 3, "temperature": 0}
            for i in range(6)]
    write_lines(inp, reqs)
    cfg = config("batch", checkpoint=tiny_checkpoints["original"], input=inp, output=out, progress=False)
    batch.run(cfg)
    full = out.read_text().splitlines()
    # A crash after two whole lines and half of the third: the rerun drops the partial line and redoes the
    # rest.
    out.write_text("\n".join(full[:2]) + "\n" + full[2][: len(full[2]) // 2])
    stats = batch.run(cfg)
    assert stats["skipped"] == 2 and stats["requests"] == 4
    rows = read_output(out)
    assert sorted(r["id"] for r in rows) == list(range(6))
    assert ({r["id"]: r["token_ids"] for r in rows}
            == {json.loads(l)["id"]: json.loads(l)["token_ids"] for l in full})
    assert batch.run(cfg)["requests"] == 0  # a third run has nothing left to do


def test_a_repeated_id_gets_an_error_line_of_its_own(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, [{"id": rid, "prompt": "x", "max_tokens": 2} for rid in ("a", "b", "a")])
    cfg = config("batch", checkpoint=tiny_checkpoints["original"], input=inp, output=out, progress=False)
    batch.run(cfg)
    rows = read_output(out)
    assert [(r["id"], r.get("line")) for r in rows] == [("a", None), ("b", None), (None, 3)]
    assert rows[2]["error"] == ("line 3: id 'a' is already used by line 1; ids must be unique "
                                "(this line did not run)")
    assert batch.run(cfg)["requests"] == 0  # the error line is its result: a rerun has nothing to do


def test_retry_errors_runs_the_failed_requests_again(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    good = {"id": "good", "prompt_token_ids": [5, 6], "max_tokens": 2, "temperature": 0}
    write_lines(inp, [good, {"id": "fixed", "prompt_token_ids": [5, 6], "max_tokns": 2}, '{"id": "cut", '])
    cfg = dict(checkpoint=tiny_checkpoints["original"], input=inp, output=out, progress=False)
    batch.run(config("batch", **cfg))
    first = read_output(out)
    assert [r["finish_reason"] for r in first] == ["length", "error", "error"]
    # The user fixes both lines. A plain rerun runs "cut", whose line now has an id (its old error,
    # keyed by line number, stays after the input's results), but "fixed" keeps its error...
    write_lines(inp, [good, {**good, "id": "fixed"}, {**good, "id": "cut"}])
    assert batch.run(config("batch", **cfg))["requests"] == 1
    assert [(r["id"], r["finish_reason"]) for r in read_output(out)] == [
        ("good", "length"), ("fixed", "error"), ("cut", "length"), (None, "error")]
    # ...until retry_errors=true runs the failed requests again and drops their errors.
    stats = batch.run(config("batch", **cfg, retry_errors=True))
    rows = read_output(out)
    assert stats["requests"] == 1 and stats["errors"] == 0
    assert [r["id"] for r in rows] == ["good", "fixed", "cut"]  # one line per id, in input order
    assert rows[0] == first[0] and rows[1]["token_ids"] == rows[0]["token_ids"]


def test_both_jobs_share_one_parse_and_write_core(tmp_path, monkeypatch):
    inp = tmp_path / "in.jsonl"
    write_lines(inp, [{"id": "a", "prompt_token_ids": [1, 2, 3], "logprobs": True},
                      '{"id": "broken", "prompt": ', {"prompt_token_ids": [4]},
                      {"id": "bad-field", "prompt_token_ids": [5], "max_tokns": 2},
                      {"id": 7, "prompt_token_ids": [6, 7, 8, 9, 10]}])
    single = SimpleNamespace(rank=0, world_size=1, is_writer=True, scheduler_index=0,
                             layout=SimpleNamespace(schedulers=1))
    monkeypatch.setattr(batch, "init_parallel", lambda cfg: single)
    monkeypatch.setattr(batch, "build_llm", lambda cfg, parallel: EchoLLM())
    stats = batch.run(config("batch", input=inp, output=tmp_path / "out.jsonl", progress=False))
    actor = object.__new__(ray_batch.RankActor)  # its engine, without Ray or a process group
    actor.parallel, actor.llm = SimpleNamespace(is_writer=True), EchoLLM()
    # What the Ray driver hands an actor: each line's number, text, and the error found in reading it.
    lines = [(line.number, text, line.error) for line, text in ray_batch.read_lines(str(inp))]
    written = actor.generate(lines, str(tmp_path / "part.jsonl"))
    torchrun, ray = read_output(tmp_path / "out.jsonl"), read_output(tmp_path / "part.jsonl")
    assert stats["written"] == len(written) == 5 and stats["errors"] == 3 and stats["tokens"] == 7
    # The same records but for their order: the torchrun job's output is merged in input order, a Ray
    # part file holds them as they finished (the errors first).
    assert sorted(map(json.dumps, torchrun)) == sorted(map(json.dumps, ray))
    assert [r["id"] for r in torchrun] == ["a", None, None, "bad-field", 7]
    assert ray == [
        {"id": None, "token_ids": [], "text": "", "finish_reason": "error", "line": 2,
         "error": ray[0]["error"]},
        {"id": None, "token_ids": [], "text": "", "finish_reason": "error", "line": 3,
         "error": "line 3: field 'id' must be a string or an integer, got None"},
        {"id": "bad-field", "token_ids": [], "text": "", "finish_reason": "error",
         "error": ray[2]["error"]},
        {"id": "a", "token_ids": [1, 2, 3], "text": "echo", "finish_reason": "length", "logprobs": [0.5] * 3},
        {"id": 7, "token_ids": [6, 7, 8, 9], "text": "echo", "finish_reason": "length"},
    ]
    assert ray[0]["error"].startswith(f"line 2: {inp}:2: not valid JSON (")
    assert ray[2]["error"].startswith("line 4: unknown field(s) 'max_tokns'")


def _broken_copy(src, dst, edit):
    """A copy of a checkpoint whose tensors or config were changed by `edit(tensors, config)`."""
    dst.mkdir()
    tensors = load_file(src / "model.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    edit(tensors, cfg)
    save_file(tensors, dst / "model.safetensors")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("edit, words", [
    (lambda t, c: t.pop("block.1.attn.sinks"), "block.1.attn.sinks"),
    (lambda t, c: t.update({"block.2.attn.out.bias": t["block.2.attn.out.bias"][:-1].clone()}),
     "block.2.attn.out.bias"),
    (lambda t, c: c.pop("num_experts"), "num_experts"),
    (lambda t, c: c.update({"hidden_size": "wide"}), "hidden_size"),
])
def test_bad_checkpoint_stops_the_job_at_start(tiny_checkpoints, tmp_path, capsys, edit, words):
    broken = _broken_copy(Path(tiny_checkpoints["original"]), tmp_path / "ckpt", edit)
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, GOOD[:1])
    with pytest.raises(SystemExit) as exit_info:
        batch.run(config("batch", checkpoint=broken, input=inp, output=out, progress=False))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert words in err and err.startswith("error:"), err
    assert not out.exists()


def test_cli_end_to_end_and_missing_checkpoint(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_lines(inp, GOOD)
    env = {**os.environ,
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ok = subprocess.run([sys.executable, "-m", "launch.batch", f"checkpoint={tiny_checkpoints['hf']}",
                         f"input={inp}", f"output={out}", f"stats={tmp_path / 'stats.json'}"],
                        capture_output=True, text=True, env=env, cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr
    assert "tokens/s" in ok.stderr and len(read_output(out)) == len(GOOD)
    assert "prompt tokens (" in ok.stderr and "from the prefix cache" in ok.stderr
    assert json.loads((tmp_path / "stats.json").read_text())["requests"] == len(GOOD)
    missing = subprocess.run([sys.executable, "-m", "launch.batch", f"checkpoint={tmp_path / 'nope'}",
                              f"input={inp}", f"output={tmp_path / 'o2.jsonl'}"], capture_output=True,
                             text=True, env=env, cwd=tmp_path)
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_stats_file_counts_the_prefix_cache_and_caching_changes_no_output(tiny_checkpoints, tmp_path):
    """A Harmony chat file with one system message: every request after the first finds the shared
    start in the prefix cache; the stats file and the stderr summary say so; outputs equal a run
    with caching off."""
    inp = tmp_path / "in.jsonl"
    system = {"role": "system", "content": "You answer every question about numbers in one short word."}
    write_lines(inp, [{"id": i, "messages": [system, {"role": "user", "content": f"What is {i} + {i}?"}],
                       "max_tokens": 5, "temperature": 0, "logprobs": True} for i in range(6)])
    runs = {}
    for on in (True, False):
        out, stats_file = tmp_path / f"out-{on}.jsonl", tmp_path / f"stats-{on}.json"
        stats = batch.run(config("batch", checkpoint=tiny_checkpoints["original"], input=inp, output=out,
                                 progress=False, enable_prefix_caching=on))
        batch.write_stats(str(stats_file), stats)
        runs[on] = read_output(out), json.loads(stats_file.read_text())
    (cached_rows, cached), (plain_rows, plain) = runs[True], runs[False]
    for key in ("requests", "prompt_tokens", "cached_prompt_tokens", "generated_tokens", "seconds",
                "preemptions", "preempted_tokens"):
        assert key in cached and key in plain
    assert cached["requests"] == 6 and cached["prompt_tokens"] == plain["prompt_tokens"] > 6 * 16
    assert plain["cached_prompt_tokens"] == 0 and cached["cached_prompt_tokens"] >= 5 * 16
    assert cached["generated_tokens"] == sum(len(r["token_ids"]) for r in cached_rows)
    for a, b in zip(cached_rows, plain_rows):
        assert a["token_ids"] == b["token_ids"]
        assert max(abs(x - y) for x, y in zip(a["logprobs"], b["logprobs"])) < 1e-4
    assert "from the prefix cache" in batch.summary(cached)
