"""The sbatch scripts on a real one-node Slurm cluster (CI starts one: slurm/ci/local_cluster.sh).

Skipped where no cluster answers. On CPU: the tiny model, two gloo ranks as two data-parallel
replicas sharing the input, and a requeue in the middle of a job that must resume, not repeat.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


pytestmark = pytest.mark.skipif(not cluster_up(), reason="no Slurm cluster (CI starts one with slurm/ci/local_cluster.sh)")


def env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHON": sys.executable}


def sbatch(tmp_path, *args, extra_env=None, wait=True, script="batch.sbatch", options=()):
    cmd = ["sbatch", "--parsable", "--export=ALL", "-o", str(tmp_path / "slurm-%j.out"), "-D", str(tmp_path), *options]
    cmd += (["--wait"] if wait else []) + [str(REPO / "slurm" / script), "device=cpu", *args]
    done = subprocess.run(cmd, env={**env(), **(extra_env or {})}, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + log(tmp_path)
    return done.stdout.strip().split(";")[0]


def log(tmp_path):
    return "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))


def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def write_requests(path, n, long_after=None):
    path.write_text("".join(json.dumps({"id": i, "prompt": f"request {i}", "temperature": 0, "ignore_eos": True,
                                        "max_tokens": 4 if long_after is None or i < long_after else 150}) + "\n"
                            for i in range(n)))


def test_one_node_two_replicas(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 12)
    sbatch(tmp_path, f"checkpoint={tiny_checkpoints['original']}", f"input={inp}", f"output={out}",
           extra_env={"NPROC": "2"})
    rows = records(out)
    assert sorted(r["id"] for r in rows) == list(range(12)), log(tmp_path)
    assert all(r["finish_reason"] == "length" and len(r["token_ids"]) == 4 for r in rows)
    assert "2 rank(s)" in log(tmp_path)


def test_multinode_script_on_one_node(tiny_checkpoints, tmp_path):
    """The multi-node script's path (srun, torchrun per node, c10d rendezvous on the first node),
    on the one node CI has: 2 ranks, tp=2, one replica."""
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 6)
    sbatch(tmp_path, f"checkpoint={tiny_checkpoints['original']}", f"input={inp}", f"output={out}", "parallel.tp=2",
           extra_env={"NPROC": "2", "RDZV_PORT": str(29600 + os.getpid() % 300)}, script="batch_multinode.sbatch",
           options=["--nodes=1"])
    assert sorted(r["id"] for r in records(out)) == list(range(6)), log(tmp_path)
    assert "1 node(s) x 2 rank(s)" in log(tmp_path)


def test_requeue_resumes_without_repeating(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 24, long_after=2)
    job = sbatch(tmp_path, f"checkpoint={tiny_checkpoints['original']}", f"input={inp}", f"output={out}",
                 "max_batch_size=4", wait=False)
    deadline = time.time() + 120
    while not (out.exists() and out.read_text().count("\n") >= 1):
        assert time.time() < deadline, log(tmp_path)
        time.sleep(0.3)
    # What Slurm sends before a time limit (--signal=B:USR1@120): the script stops and requeues itself.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    requeued = False
    while time.time() < deadline + 600:  # generous: a loaded 2-core machine runs the tiny model slowly
        state = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.strip()
        node = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True).stdout.strip()
        if state == "PENDING" and not requeued and node == "idle":
            # Slurm holds a requeued job back for a while; start it now rather than wait in a test,
            # but only once the node has finished cleaning up the first run (forcing the start
            # while it is still completing makes the second run fail at launch).
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
            requeued = True
        # squeue can briefly list nothing while a job is being requeued: done only once the job is
        # gone after its second start and every request is written.
        if not state and requeued and out.read_text().count("\n") >= 24:
            break
        time.sleep(0.5)
    text = log(tmp_path)
    assert requeued and "restart 1" in text and "USR1: stopping" in text, text
    rows = records(out)
    assert sorted(r["id"] for r in rows) == list(range(24)), text  # each id exactly once
    assert "already done" in text.split("restart 1")[1]
