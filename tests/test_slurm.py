"""The sbatch scripts on a real one-node Slurm cluster (CI starts one: slurm/ci/local_cluster.sh).

Skipped where no cluster answers. On CPU: the tiny model, two gloo ranks as two data-parallel
replicas sharing the input, and a requeue in the middle of a job that must resume, not repeat.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from batch_jobs import written_lines

REPO = Path(__file__).resolve().parents[1]


def cluster_up() -> bool:
    if not shutil.which("sinfo"):
        return False
    try:
        return subprocess.run(["sinfo", "-h"], capture_output=True, timeout=10).returncode == 0
    except subprocess.TimeoutExpired:
        return False


pytestmark = pytest.mark.skipif(not cluster_up(),
                                reason="no Slurm cluster (CI starts one with slurm/ci/local_cluster.sh)")


def env():
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "PYTHON": sys.executable}


def sbatch(tmp_path, *args, extra_env=None, wait=True, script="batch.sbatch", options=()):
    cmd = ["sbatch", "--parsable", "--export=ALL", "-o", str(tmp_path / "slurm-%j.out"), "-D", str(tmp_path),
           *options]
    cmd += (["--wait"] if wait else []) + [str(REPO / "slurm" / script), "device=cpu", *args]
    done = subprocess.run(cmd, env={**env(), **(extra_env or {})}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr + log(tmp_path)
    return done.stdout.strip().split(";")[0]


def log(tmp_path):
    return "".join(p.read_text() for p in tmp_path.glob("slurm-*.out"))


ENDED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE"}


def job_record(job):
    """`scontrol show job` as {field: value} (slurmctld keeps an ended job's record for MinJobAge)."""
    text = subprocess.run(["scontrol", "-o", "show", "job", job], capture_output=True, text=True).stdout
    return dict(field.split("=", 1) for field in text.split() if "=" in field)


def slurmctld_log(job):
    """slurmctld's log lines about one job, for failure messages: why a launch failed is told there."""
    config = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True).stdout
    path = re.search(r"^SlurmctldLogFile\s*=\s*(\S+)", config, re.MULTILINE)
    try:
        lines = Path(path.group(1)).read_text(errors="replace").splitlines() if path else []
    except OSError:
        return ""
    return "\n".join(line for line in lines if re.search(rf"JobId={job}\b", line))


def records(path):
    return [json.loads(l) for l in path.read_text().splitlines()]


def write_requests(path, n, long_after=None):
    path.write_text("".join(
        json.dumps({"id": i, "prompt": f"request {i}", "temperature": 0, "ignore_eos": True,
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
    sbatch(tmp_path, f"checkpoint={tiny_checkpoints['original']}", f"input={inp}", f"output={out}",
           "parallel.tp=2", extra_env={"NPROC": "2", "RDZV_PORT": str(29600 + os.getpid() % 300)},
           script="batch_multinode.sbatch", options=["--nodes=1"])
    assert sorted(r["id"] for r in records(out)) == list(range(6)), log(tmp_path)
    assert "1 node(s) x 2 rank(s)" in log(tmp_path)


def test_requeue_resumes_without_repeating(tiny_checkpoints, tmp_path):
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_requests(inp, 24, long_after=2)
    job = sbatch(tmp_path, f"checkpoint={tiny_checkpoints['original']}", f"input={inp}", f"output={out}",
                 "max_batch_size=4", wait=False)
    deadline = time.time() + 120
    while not written_lines(out):  # results so far are in the output's parts
        assert time.time() < deadline, log(tmp_path)
        time.sleep(0.3)
    # What Slurm sends before a time limit (--signal=B:USR1@120): the script stops and requeues itself.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)
    # Slurm starts the requeued job again by itself once its requeue hold is over (cred_expire + 1 s:
    # 11 s on the CI cluster, see slurm/ci/local_cluster.sh). Don't force an earlier start
    # (scontrol update StartTime=now): a relaunch within the second in which the first run's
    # credential was revoked is refused by slurmd, and the job fails without running.
    # Done once the job has ended after its restart; given up on after 5 minutes without a new row
    # (a loaded 2-core machine runs the tiny model slowly, even 20 times slower, but it runs).
    written, progress = 0, time.time()
    while time.time() - progress < 300:
        record = job_record(job)
        if int(record.get("Restarts", 0)) >= 1 and record.get("JobState") in ENDED:
            break
        if (lines := len(written_lines(out))) > written:
            written, progress = lines, time.time()
        time.sleep(0.5)
    text = log(tmp_path)
    fields = {k: record.get(k) for k in ("JobState", "Reason", "Restarts", "ExitCode", "RunTime")}
    why = f"{text}\n{fields}\n{slurmctld_log(job)}"
    assert record.get("JobState") == "COMPLETED" and "restart 1" in text and "USR1: stopping" in text, why
    rows = records(out)
    assert sorted(r["id"] for r in rows) == list(range(24)), why  # each id exactly once
    assert "already done" in text.split("restart 1")[1]
