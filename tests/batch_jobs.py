"""What the tests of the batch jobs share: a job's hydra config and an engine stand-in (for jobs run in
the test's process); the environment and command of a job run as processes, what it has written so
far, and the pid of one torchrun worker."""

import json
import os
import subprocess
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir

from runtime.config import CONFIG_DIR
from runtime.engine import Result
from runtime.requests import parse_request

REPO = Path(__file__).resolve().parents[1]


def config(name, **overrides):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base=None):
        return compose(name, overrides=[f"{k}={v}" for k, v in overrides.items()])


class EchoLLM:
    """An engine stand-in: the real request checks, and each request's prompt echoed as its output."""

    graph_replays = mixed_graph_replays = preemptions = preempted_tokens = 0

    def make_request(self, obj):
        return parse_request(obj, max_model_len=64, vocab_size=1000, default_max_tokens=4)

    def generate(self, requests, on_result, should_stop=None):
        for request in requests:
            tokens = request.prompt_token_ids[: request.params.max_tokens]
            on_result(Result(request.id, token_ids=tokens, text="echo", finish_reason="length",
                             logprobs=[0.5] * len(tokens) if request.params.logprobs else None))


def job_env(**extra) -> dict:
    """This checkout on the path, one thread per rank (2-8 ranks share CI's 2 cores)."""
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1", **extra}


def batch_command(nproc, checkpoint, inp, out, *overrides) -> list[str]:
    """launch.batch on nproc gloo ranks (torchrun) or in this interpreter's process (nproc 1)."""
    launcher = [sys.executable, "-m"]
    if nproc > 1:
        launcher += ["torch.distributed.run", "--nproc-per-node", str(nproc),
                     "--master-port", str(29500 + os.getpid() % 1000), "-m"]
    return launcher + ["launch.batch", f"checkpoint={checkpoint}", f"input={inp}", f"output={out}",
                       "progress=false", *overrides]


def start_batch(nproc, checkpoint, inp, out, *overrides, extra_env=None) -> subprocess.Popen:
    return subprocess.Popen(batch_command(nproc, checkpoint, inp, out, *overrides),
                            env=job_env(**(extra_env or {})), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def written_lines(out) -> list[str]:
    """The whole result lines a job has written so far: the merged output's, then its parts'."""
    out = Path(out)
    files = ([out] if out.exists() else []) + sorted(Path(f"{out}.parts").glob("*.jsonl"))
    lines = []
    for f in files:
        text = f.read_text()
        lines += text.splitlines()[: text.count("\n")]  # a line still being written is not counted
    return lines


def results_by_id(path) -> dict:
    return {r["id"] if r["id"] is not None else f"line {r['line']}": r
            for r in map(json.loads, Path(path).read_text().splitlines())}


def rank_pid(launcher_pid, rank) -> int:
    """The pid of the torchrun worker (a child of the launcher) with RANK=rank."""
    for entry in Path("/proc").iterdir():
        try:
            parent = int(next(l for l in (entry / "status").read_text().splitlines()
                              if l.startswith("PPid:")).split()[1])
            if (parent == launcher_pid
                    and f"RANK={rank}".encode() in (entry / "environ").read_bytes().split(b"\0")):
                return int(entry.name)
        except (OSError, ValueError, StopIteration):
            continue
    raise LookupError(f"no worker with RANK={rank} under pid {launcher_pid}")
