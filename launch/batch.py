"""Offline batch generation: JSONL requests in, JSONL results out, resumable.

    python -m launch.batch input=IN.jsonl output=OUT.jsonl [checkpoint=DIR] [dtype=bfloat16] [device=cuda]
        [stats=STATS.json]

Results are written as requests finish, each replica to its own part file in OUT.jsonl.parts/; when
every request has a result they are merged into OUT.jsonl in input order (launch/results_store.py).
Rerunning with the same output skips the ids already done. A request that cannot run (bad JSON, an
unknown field, a repeated id, a prompt over the context limit, ...) gets an `error` line of its own and
the others go on; retry_errors=true runs such requests again.

At the end (finished or stopped) a summary of this run goes to stderr and, with stats=FILE, to FILE
as JSON: requests, prompt_tokens, cached_prompt_tokens (served by the prefix cache),
generated_tokens, seconds, preemptions, preempted_tokens (computed KV positions the preemptions
threw away, to compute again), ..., over every replica.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

import hydra
import torch.distributed
from omegaconf import DictConfig

from launch.batch_core import ResultWriter, flag_repeated_ids, not_done, to_requests
from launch.common import (build_llm, check_job_args, clean_exit, fail_fast, init_parallel,
                           interrupted_quietly, rank_prefix)
from launch.progress import Progress
from launch.results_store import ResultsStore, parts_dir
from parallel import groups
from parallel.groups import Parallel
from runtime.jsonl import NoOutput, OutputFile, read_input


class StopSignal:
    """SIGTERM (Slurm's preemption and requeue, torchrun's shutdown), SIGUSR1 or Ctrl-C (SIGINT) ends the
    job after the current step: every finished result is already on disk, the rest runs again on resume.
    A second Ctrl-C stops at once (what is on disk stays)."""

    def __init__(self):
        self.received = None
        for sig in (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.received = signal.Signals(signum).name
        signal.signal(signal.SIGINT, signal.default_int_handler)

    def __call__(self) -> bool:
        return self.received is not None


def recover_done(store: ResultsStore, retry_errors: bool) -> set | None:
    """The first rank alone checks and repairs the results files and reads what is done (before the
    model loads, so that a refused output costs no loading); the other ranks learn it in `share_done`."""
    return store.recover(retry_errors) if int(os.environ.get("RANK", 0)) == 0 else None


def share_done(done: set | None, parallel: Parallel) -> set:
    """All ranks take the first rank's answer, so all agree on the work (a collective: no rank writes
    before the first rank has repaired the files)."""
    if parallel.world_size > 1:
        box = [done]
        torch.distributed.broadcast_object_list(box, src=0)
        done = box[0]
    return done


def open_part(store: ResultsStore, parallel: Parallel, work: list) -> OutputFile | NoOutput:
    """Every rank of a replica runs the same loop on the same requests and its first rank writes, to
    the replica's own part file; replicas (dp) take every dp-th request, so no two write the same id.
    Under attention_dp every rank is such a writer with its own share. A writer without work makes no
    file."""
    if parallel.is_writer and work:
        return store.part(f"replica-{parallel.scheduler_index}.jsonl")
    return NoOutput(store.parts)


def run(cfg: DictConfig) -> dict:
    with clean_exit():  # bad arguments, paths, output files, checkpoints or layouts stop the job here
        check_job_args(cfg, "input", "output")
        store = ResultsStore(cfg.output)
        lines = list(flag_repeated_ids(read_input(cfg.input)))
        done = recover_done(store, cfg.retry_errors)
        parallel = init_parallel(cfg)
        llm = build_llm(cfg, parallel)
    done = share_done(done, parallel)
    # Finished in an earlier run: skipped.
    todo = list(not_done(lines, done))
    skipped = len(lines) - len(todo)
    todo = todo[parallel.scheduler_index::parallel.layout.schedulers]
    progress = Progress(len(todo), enabled=cfg.progress and parallel.rank == 0,
                        interval_s=cfg.progress_interval_s)
    stop = StopSignal()
    preemptions, preempted_tokens = llm.preemptions, llm.preempted_tokens
    start = time.perf_counter()
    with open_part(store, parallel, todo) as out:
        write = ResultWriter(out, on_write=lambda result: progress.update(len(result.token_ids)))
        requests = to_requests(todo, llm.make_request, on_error=write)
        llm.generate(requests, on_result=write, should_stop=stop)
        progress.close()
    stats = {"requests": len(todo), **write.counts, "skipped": skipped, "stopped_by": stop.received,
             "graph_replays": llm.graph_replays, "mixed_graph_replays": llm.mixed_graph_replays,
             "preemptions": llm.preemptions - preemptions,
             "preempted_tokens": llm.preempted_tokens - preempted_tokens,
             "seconds": time.perf_counter() - start}
    stats = over_replicas(stats, parallel)  # a collective: past it, every replica has written its results
    stats["generated_tokens"] = stats["tokens"]
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    # The first rank alone merges, once every request has its result (no two ranks race to rename).
    keys = [line.key for line in lines]
    complete = parallel.rank == 0 and not stop.received and set(keys) <= store.done()
    stats["merged"] = store.merge(keys) is not None if complete else False
    return stats


# Counts that add up over replicas (each runs every dp-th request); the others are the first replica's,
# but seconds, which is the slowest replica's.
SUMMED = ("requests", "written", "errors", "tokens", "prompt_tokens", "cached_prompt_tokens", "graph_replays",
          "mixed_graph_replays", "preemptions", "preempted_tokens")


def over_replicas(stats: dict, parallel: Parallel) -> dict:
    """The job's stats from every replica's first rank (the one that writes and counts)."""
    if parallel.world_size == 1:
        return stats
    every = [None] * parallel.world_size
    torch.distributed.all_gather_object(every, (parallel.is_writer, stats))
    writers = [s for is_writer, s in every if is_writer]
    total = {**writers[0], **{key: sum(s[key] for s in writers) for key in SUMMED}}
    total["seconds"] = max(s["seconds"] for s in writers)
    return total


def summary(stats: dict) -> str:
    cached = stats["cached_prompt_tokens"] / max(stats["prompt_tokens"], 1)
    return (f"{stats['requests']} requests ({stats['errors']} failed, {stats['skipped']} already done), "
            f"{stats['prompt_tokens']} prompt tokens ({stats['cached_prompt_tokens']} from the prefix cache, "
            f"{100 * cached:.1f}%), {stats['generated_tokens']} generated in {stats['seconds']:.1f} s, "
            f"{stats['tokens_per_s']:.1f} tokens/s, {stats['preemptions']} preemptions "
            f"({stats['preempted_tokens']} computed positions thrown away), "
            f"{stats['graph_replays']} steps replayed from CUDA graphs "
            f"({stats['mixed_graph_replays']} of them mixed)")


def write_stats(path: str, stats: dict) -> None:
    keys = ("requests", "prompt_tokens", "cached_prompt_tokens", "generated_tokens", "seconds", "preemptions",
            "preempted_tokens", "errors", "skipped", "written", "tokens_per_s", "graph_replays",
            "mixed_graph_replays", "stopped_by", "merged")
    with open(path, "w") as f:
        json.dump({key: stats[key] for key in keys}, f, indent=2)
        f.write("\n")


@hydra.main(version_base=None, config_path="../configs", config_name="batch")
def main(cfg: DictConfig) -> None:
    with fail_fast(), interrupted_quietly("results finished so far are on disk; rerun with the same "
                                          "output to resume"):
        stats = run(cfg)
        groups.shutdown()
    first = int(os.environ.get("RANK", 0)) == 0
    if first and cfg.stats:
        write_stats(cfg.stats, stats)
    if first:
        print(f"{'stopped' if stats['stopped_by'] else 'done'}: {summary(stats)}", file=sys.stderr)
    if stats["stopped_by"]:
        print(f"stopped by {stats['stopped_by']}: {stats['written']} of {stats['requests']} "
              f"requests written; rerun with the same output to finish the rest", file=sys.stderr)
        sys.exit(128 + getattr(signal, stats["stopped_by"]))
    if stats["merged"]:
        print(f"{rank_prefix()}every request has its result: {cfg.output} written", file=sys.stderr)
    if first and not stats["merged"]:
        print(f"results so far are in {parts_dir(cfg.output)}/; {cfg.output} is written when every "
              f"request has its result", file=sys.stderr)


if __name__ == "__main__":
    main()
