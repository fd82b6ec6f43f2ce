"""The job's results on disk (launch/results_store.py): the output is the job's own or it is refused,
before anything loads; replicas write parts of their own; the finished job merges them in input order."""

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest

from batch_jobs import EchoLLM, config, job_env
from launch import batch, generate, ray_batch
from launch.results_store import MERGE_LOCK, ResultsStore
from runtime.engine import Result
from runtime.jsonl import NotResults, OutputFile


def result(rid, tokens=(1, 2), error=None, line=None):
    record = Result(rid, list(tokens), finish_reason="error" if error else "length", error=error).to_json()
    if line is not None:
        record["line"] = line
    return json.dumps(record) + "\n"


REQUESTS = "".join(json.dumps({"id": i, "prompt_token_ids": [5 + i], "max_tokens": 2}) + "\n"
                   for i in range(3))


@pytest.fixture
def no_model(monkeypatch):
    """The batch jobs with an engine that must not be loaded: a check that runs late fails the test."""
    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the check")
    for job in (batch, generate):
        monkeypatch.setattr(job, "build_llm", load)
    monkeypatch.setattr(batch, "init_parallel", load)


def refused(capsys, run, cfg):
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("text, found", [
    ("notes\nlast line", "o.jsonl:1 is not a result of this runtime (found 'notes')"),
    ("5\n", "(found '5')"),
    ("null\n", "(found 'null')"),
    ('{"id": [1, 2]}\n', "(found '{\"id\": [1, 2]}')"),
    ('{"id": 1, "prompt": "x"}\n', "o.jsonl:1 is not a result"),  # a requests file given as output
    (result(0) + "last line", "o.jsonl:2 is not a result of this runtime (found 'last line' without a final"),
])
def test_an_output_that_is_not_the_jobs_own_is_refused_untouched(tmp_path, capsys, no_model, text, found):
    inp, out = tmp_path / "in.jsonl", tmp_path / "o.jsonl"
    inp.write_text(REQUESTS)
    out.write_text(text)
    err = refused(capsys, batch.run, config("batch", input=inp, output=out))
    assert found in err and "give another path, or move" in err
    assert out.read_text() == text and not (tmp_path / "o.jsonl.parts").exists()


def test_the_input_as_output_is_refused_and_left_whole(tmp_path, capsys, no_model):
    inp = tmp_path / "in.jsonl"
    inp.write_text(REQUESTS.rstrip("\n"))  # no final newline: once, its last line was cut and replaced
    (tmp_path / "link.jsonl").symlink_to(inp)
    os.link(inp, tmp_path / "hard.jsonl")
    for output in (inp, tmp_path / "link.jsonl", tmp_path / "hard.jsonl", f"{tmp_path}/./in.jsonl"):
        err = refused(capsys, batch.run, config("batch", input=inp, output=output))
        assert "is the input file" in err
    assert inp.read_text() == REQUESTS.rstrip("\n")


@pytest.mark.parametrize("job", [batch, ray_batch])
def test_arguments_and_paths_are_checked_before_anything_loads(tmp_path, capsys, no_model, job):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(REQUESTS)
    name = "batch" if job is batch else "ray_batch"
    assert "input= is required" in refused(capsys, job.run, config(name, output=out))
    assert "output= is required" in refused(capsys, job.run, config(name, input=inp))
    assert "input file" in refused(capsys, job.run, config(name, input=tmp_path / "nope.jsonl", output=out))
    assert "is a directory" in refused(capsys, job.run, config(name, input=inp, output=tmp_path))
    tp0 = config(name, input=inp, output=out, **{"parallel.tp": 0})
    assert "parallel.tp" in refused(capsys, job.run, tp0)
    (tmp_path / "out.jsonl.parts").write_text("")
    assert "in the way" in refused(capsys, job.run, config(name, input=inp, output=out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl.parts"]


def test_generate_checks_its_arguments_before_loading(capsys, no_model):
    assert "prompt=" in refused(capsys, generate.run, config("generate", prompt="''"))
    assert "reasoning_effort=" in refused(capsys, generate.run, config("generate", reasoning_effort="max"))
    assert "temperature" in refused(capsys, generate.run, config("generate", temperature=-1))


def test_errors_on_the_command_line_are_one_line_with_status_2(tmp_path):
    inp = tmp_path / "in.jsonl"
    inp.write_text(REQUESTS)
    for args in ([f"input={inp}", f"output={inp}"], [f"input={inp}", "output=o.jsonl", "parallel.ep=0"]):
        done = subprocess.run([sys.executable, "-m", "launch.batch", *args], capture_output=True, text=True,
                              env=job_env(), cwd=tmp_path, timeout=120)
        assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
        assert done.stderr.startswith("error: ")


def test_each_replica_writes_its_own_part_and_the_last_one_merges(tmp_path, monkeypatch):
    """Two data-parallel replicas of one job, one finishing before the other: the first's part alone is
    not every request, so it leaves OUTPUT unwritten; the second finds all done and merges, in input
    order."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text(REQUESTS)
    monkeypatch.setattr(batch, "build_llm", lambda cfg, parallel: EchoLLM())
    monkeypatch.setattr(batch, "share_done", lambda done, parallel: set())  # both start with nothing done
    for dp_rank, merged in ((1, False), (0, True)):
        replica = SimpleNamespace(rank=0, world_size=1, is_writer=True, scheduler_index=dp_rank,
                                  layout=SimpleNamespace(schedulers=2))
        monkeypatch.setattr(batch, "init_parallel", lambda cfg: replica)
        stats = batch.run(config("batch", input=inp, output=out, progress=False))
        assert stats["merged"] == merged and out.exists() == merged
        if not merged:
            assert [json.loads(l)["id"] for l in (tmp_path / "out.jsonl.parts/replica-1.jsonl").open()] == [1]
    assert [json.loads(l)["id"] for l in out.open()] == [0, 1, 2]
    assert not (tmp_path / "out.jsonl.parts").exists()


def test_merge_orders_by_input_keeps_the_first_of_a_key_and_is_exclusive(tmp_path):
    store = ResultsStore(tmp_path / "out.jsonl")
    store.output.write_text(result("b", (9,)))
    store.parts.mkdir()
    (store.parts / "replica-0.jsonl").write_text(result("c") + result("b", (8,)))
    (store.parts / "replica-1.jsonl").write_text(result("gone") + result(None, error="bad", line=4))
    order = [("id", "a"), ("line", 4), ("id", "b"), ("id", "c")]  # "a" has no result yet
    (store.parts / MERGE_LOCK).touch()
    assert store.merge(order) is None  # another writer holds the lock: nothing changes
    assert store.output.read_text() == result("b", (9,))
    assert store.recover() == {("id", "b"), ("id", "c"), ("id", "gone"), ("line", 4)}  # a stale lock goes
    assert store.merge(order) == 4
    assert store.output.read_text() == (result(None, error="bad", line=4) + result("b", (9,)) + result("c")
                                        + result("gone"))  # the output's own "b" wins; unknown keys last
    assert not store.parts.exists()
    assert store.merge(order) == 4 and store.done() == {("id", "b"), ("id", "c"), ("id", "gone"), ("line", 4)}


def test_recover_drops_only_cut_results_and_retry_drops_errors(tmp_path):
    store = ResultsStore(tmp_path / "out.jsonl")
    store.output.write_text(result("ok") + result("failed", error="boom") + '{"id": "cut", "tok')
    store.parts.mkdir()
    (store.parts / "replica-0.jsonl").write_text(result(None, error="bad", line=7) + '{"i')
    assert store.done() == {("id", "ok"), ("id", "failed"), ("line", 7)}  # reading changes nothing
    assert store.output.read_text().endswith('"tok')
    assert store.recover(retry_errors=True) == {("id", "ok")}
    assert store.output.read_text() == result("ok")
    assert (store.parts / "replica-0.jsonl").read_text() == ""


def test_a_foreign_line_in_a_part_is_refused_too(tmp_path):
    store = ResultsStore(tmp_path / "out.jsonl")
    store.parts.mkdir()
    (store.parts / "replica-0.jsonl").write_text(result("ok") + "# my notes\n")
    with pytest.raises(NotResults, match=r"replica-0.jsonl:2 is not a result"):
        store.recover()
    assert (store.parts / "replica-0.jsonl").read_text() == result("ok") + "# my notes\n"


def test_output_file_appends_whole_fsynced_lines(tmp_path):
    path = tmp_path / "part.jsonl"
    path.write_text(result("a") + '{"id": "b", "tok')
    with OutputFile(path) as out:
        assert out.done == {("id", "a")}
        out.write(json.loads(result("c")))
    assert path.read_text() == result("a") + result("c")
