"""Offline batch generation: JSONL requests in, JSONL results out, resumable.

    python -m launch.batch input=IN.jsonl output=OUT.jsonl [checkpoint=DIR] [dtype=bfloat16] [device=cuda]

Results are appended as requests finish; rerunning with the same output skips the ids already there.
A request that cannot run (bad JSON, an unknown field, a prompt over the context limit, ...) gets an
`error` line of its own and the others go on.
"""

from __future__ import annotations

import os
import signal
import sys
import time

import hydra
import torch.distributed
from omegaconf import DictConfig

from launch.batch_core import ResultWriter, first_of_each_key, not_done, to_requests
from launch.common import build_llm, clean_exit, fail_fast, init_parallel
from launch.progress import Progress
from parallel import groups
from parallel.groups import Parallel
from runtime.jsonl import NoOutput, OutputFile, read_input


class StopSignal:
    """SIGTERM (Slurm's preemption and requeue, torchrun's shutdown) or SIGUSR1 ends the job after
    the current step: every finished result is already on disk, the rest runs again on resume."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name

    def __call__(self) -> bool:
        return self.received is not None


def open_output(path: str, parallel: Parallel) -> OutputFile:
    """Every rank of a replica runs the same loop on the same requests and its first rank writes;
    replicas (dp) take every dp-th request, so no two ever write the same id. Rank 0 alone repairs
    the file and reads what is done, and all ranks take that one answer, so all agree on the work."""
    out = OutputFile(path) if parallel.rank == 0 else None
    if parallel.world_size > 1:
        done = [out.done if out is not None else None]
        torch.distributed.broadcast_object_list(done, src=0)
        if out is None:
            out = OutputFile(path, recover=False) if parallel.is_writer else NoOutput(path)
            out.done = done[0]
    return out


def run(cfg: DictConfig) -> dict:
    with clean_exit():  # a bad checkpoint, config, layout or input path stops the job here, before any work
        parallel = init_parallel(cfg)
        llm = build_llm(cfg, parallel)
        lines = list(read_input(cfg.input))
    with open_output(cfg.output, parallel) as out:
        # Finished in an earlier run, or a repeated id (the first one wins): skipped.
        todo = list(first_of_each_key(not_done(lines, out.done)))
        skipped = len(lines) - len(todo)
        todo = todo[parallel.dp_rank::parallel.layout.dp]
        progress = Progress(len(todo), enabled=cfg.progress and parallel.rank == 0,
                            interval_s=cfg.progress_interval_s)
        write = ResultWriter(out, on_write=lambda result: progress.update(len(result.token_ids)))
        start = time.perf_counter()
        requests = to_requests(todo, llm.make_request, on_error=write)
        stop = StopSignal()
        llm.generate(requests, on_result=write, should_stop=stop)
        progress.close()
    stats = {"requests": len(todo), **write.counts, "skipped": skipped}
    stats["stopped_by"] = stop.received
    stats["graph_replays"] = llm.graph_replays
    stats["seconds"] = time.perf_counter() - start
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return stats


@hydra.main(version_base=None, config_path="../configs", config_name="batch")
def main(cfg: DictConfig) -> None:
    with fail_fast():
        stats = run(cfg)
        groups.shutdown()
    if stats["stopped_by"]:
        print(f"stopped by {stats['stopped_by']}: {stats['written']} of {stats['requests']} "
              f"requests written; rerun with the same output to finish the rest", file=sys.stderr)
        sys.exit(128 + getattr(signal, stats["stopped_by"]))
    if int(os.environ.get("RANK", 0)) != 0:
        return
    multi_rank = int(os.environ.get("WORLD_SIZE", 1)) > 1
    replica = f"replica 0 of {cfg.parallel.dp or 'all'}: " if multi_rank else ""
    print(f"done: {replica}{stats['requests']} requests ({stats['errors']} failed, "
          f"{stats['skipped']} already done), "
          f"{stats['tokens']} tokens in {stats['seconds']:.1f} s, {stats['tokens_per_s']:.1f} tokens/s, "
          f"{stats['graph_replays']} decode steps replayed from CUDA graphs", file=sys.stderr)


if __name__ == "__main__":
    main()
