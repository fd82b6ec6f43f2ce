"""A batch job killed at random moments and restarted ends with exactly the uninterrupted output: one
process, one rank of a tensor-parallel replica, one replica of two; and SIGTERM or Ctrl-C stop it cleanly.

"Exactly": one line per id, in input order, with the same tokens, text and finish reason as an
uninterrupted run, sampled requests without a seed included (their default seed comes from the job's
seed and their id, not from the order they were admitted in); logprobs agree to 1e-4 (resumed requests
share steps with other batch mates, so fp32 sums run in another order; measured ~1e-6).
"""

import json
import os
import random
import signal
import time

import pytest

from batch_jobs import rank_pid, start_batch, written_lines


def write_input(path, n=28):
    reqs = [{"id": f"r{i}", "prompt_token_ids": [1000 + i, 2000 + i, 3000 + i], "max_tokens": 20 + i % 7,
             "ignore_eos": True, "temperature": 0 if i % 2 else 0.8, "logprobs": True} for i in range(n)]
    for i, r in enumerate(reqs):
        if i % 4 == 0:
            r["seed"] = i  # the rest of the sampled ones take their default seeds
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return [r["id"] for r in reqs]


@pytest.fixture(scope="module")
def uninterrupted(tiny_checkpoints, tmp_path_factory):
    """The input, and the output of one process that ran it without interruption."""
    folder = tmp_path_factory.mktemp("resume")
    inp, out = folder / "in.jsonl", folder / "reference.jsonl"
    ids = write_input(inp)
    proc = start_batch(1, tiny_checkpoints["original"], inp, out, "max_batch_size=4")
    assert proc.wait(timeout=300) == 0, proc.stdout.read()
    assert [json.loads(l)["id"] for l in out.read_text().splitlines()] == ids  # in input order
    return inp, out


def assert_same_results(got_path, want_path, seed):
    got = [json.loads(l) for l in got_path.read_text().splitlines()]
    want = [json.loads(l) for l in want_path.read_text().splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in want], f"seed {seed}: not one line per id in order"
    for g, w in zip(got, want):
        assert ({k: v for k, v in g.items() if k != "logprobs"}
                == {k: v for k, v in w.items() if k != "logprobs"}), f"seed {seed}: {g['id']}"
        assert max(abs(a - b) for a, b in zip(g["logprobs"], w["logprobs"])) < 1e-4, f"seed {seed}"


def kill_and_resume(checkpoint, inp, out, *overrides, nproc=1, victim=None, kills=5):
    """Start the job `kills` times, SIGKILL it (or its rank `victim`) at a random moment, then let a
    last run finish. Returns the random seed (printed on failure).

    Each kill falls either at a random moment of starting up (before any new result) or just after
    the run has written 1 to 3 new results: a moment picked by progress, not by time alone, so a
    fast machine cannot finish the job before its last kill."""
    seed = int(time.time())
    rng = random.Random(seed)
    total = len(inp.read_text().splitlines())
    done = 0
    while done < kills and len(written_lines(out)) < total:
        before = len(written_lines(out))
        proc = start_batch(nproc, checkpoint, inp, out, "max_batch_size=4", *overrides)
        if rng.random() < 0.3:
            time.sleep(rng.uniform(0.2, 1.2) * nproc)  # start-up takes ~1.5 s a rank on 2 cores
        else:
            wanted, deadline = before + rng.randint(1, 3), time.time() + 120
            while len(written_lines(out)) < wanted and proc.poll() is None and time.time() < deadline:
                time.sleep(0.02)
        if victim is None:
            proc.kill()
        else:
            try:
                pid = rank_pid(proc.pid, victim)
            except LookupError:  # not started yet, or the job already ended: kill the whole job
                pid = proc.pid
            os.kill(pid, signal.SIGKILL)
        proc.wait(timeout=120)
        done += 1
    before_last = len(written_lines(out))
    last = start_batch(nproc, checkpoint, inp, out, "max_batch_size=4", *overrides)
    assert last.wait(timeout=300) == 0, last.stdout.read()
    assert done == kills and before_last < total, f"seed {seed}: the job finished before its last kill"
    return seed


def test_killed_five_times_then_finished_gives_exactly_once(tiny_checkpoints, uninterrupted, tmp_path):
    inp, reference = uninterrupted
    out = tmp_path / "out.jsonl"
    seed = kill_and_resume(tiny_checkpoints["original"], inp, out)
    assert_same_results(out, reference, seed)
    assert not (tmp_path / "out.jsonl.parts").exists()  # merged into the output, then removed


@pytest.mark.parametrize("layout", [["parallel.tp=2"], ["parallel.dp=2"]], ids=["tp2-rank", "dp2-replica"])
def test_a_killed_rank_resumes_to_the_uninterrupted_output(tiny_checkpoints, uninterrupted, tmp_path, layout):
    """Rank 1 SIGKILLed at random moments, three times: of a tensor-parallel replica (its partner then
    fails in the next collective), or the second of two replicas (torchrun stops the first)."""
    inp, reference = uninterrupted
    out = tmp_path / "out.jsonl"
    seed = kill_and_resume(tiny_checkpoints["original"], inp, out, *layout, nproc=2, victim=1, kills=3)
    assert_same_results(out, reference, seed)


def test_sigterm_and_ctrl_c_stop_cleanly_and_the_rerun_finishes(tiny_checkpoints, uninterrupted, tmp_path):
    """Stopped by SIGTERM (Slurm, torchrun), resumed, stopped by Ctrl-C, resumed to the end."""
    inp, reference = uninterrupted
    out = tmp_path / "out.jsonl"
    total = len(reference.read_text().splitlines())
    for sig, status in ((signal.SIGTERM, 128 + signal.SIGTERM), (signal.SIGINT, 130)):
        before = len(written_lines(out))
        proc = start_batch(1, tiny_checkpoints["original"], inp, out, "max_batch_size=4")
        deadline = time.time() + 60
        while len(written_lines(out)) <= before:  # stop it once this run has written a result
            assert time.time() < deadline and proc.poll() is None
            time.sleep(0.1)
        proc.send_signal(sig)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == status, output
        assert f"stopped by {signal.Signals(sig).name}" in output and "Traceback" not in output
        assert before < len(written_lines(out)) < total and not out.exists()
    rerun = start_batch(1, tiny_checkpoints["original"], inp, out, "max_batch_size=4")
    assert rerun.wait(timeout=300) == 0
    assert_same_results(out, reference, seed=None)
