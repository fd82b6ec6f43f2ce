"""Offline batch inference on Ray: requests flow as a Ray Dataset through model replicas.

    python -m launch.ray_batch input=in.jsonl output=out.jsonl replicas=2 parallel.tp=2 [checkpoint=DIR ...]
    python -m launch.ray_batch input=in.parquet output=out.parquet ...

Each replica is a group of Ray actors, one per GPU (or CPU rank), reserved together in a placement
group and joined into one torch.distributed group (NCCL on GPUs, gloo on CPUs), exactly the ranks
torchrun would start. The dataset's batches go to the replicas through an actor pool, so replicas run
in parallel. The replica's first rank appends each finished result to a part file (one line, fsync),
so a killed job resumes: finished ids are skipped, and a batch Ray retries reuses its part file.
When every request is done, the parts become the output (JSONL, or Parquet for a .parquet output).
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import sys
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.batch_core import ResultWriter, flag_repeated_ids, not_done, to_requests
from launch.common import check_job_args, clean_exit, interrupted_quietly
from launch.progress import Progress
from launch.results_store import ResultsStore, parts_dir
from runtime.jsonl import InputLine, NoOutput, OutputFile, nonblank_lines, parse_line


class RankActor:
    """One rank of a replica: joins the replica's process group and runs the engine on its shard."""

    def __init__(self, cfg: dict, rank: int, world_size: int, master_addr: str, master_port: int):
        from launch.common import build_llm
        from parallel import groups

        cfg = OmegaConf.create(cfg)
        p = cfg.parallel
        device = "cuda" if cfg.device != "cpu" and _has_gpu() else "cpu"
        layout = groups.Layout(tp=p.tp, ep=p.ep, dp=1, expert_tp=p.expert_tp)
        os.environ["LOCAL_RANK"] = "0"  # Ray shows each actor only its own GPU
        self.parallel = groups.init(layout, rank=rank, world_size=world_size, master_addr=master_addr,
                                    master_port=master_port, device_type=device, timeout_s=p.timeout_s)
        self.llm = build_llm(cfg, self.parallel)

    def generate(self, lines: list[tuple[int, str, str | None]], part: str) -> list[dict]:
        """Run a batch of input lines (number, raw text, the driver's error for the line or None); the
        first rank writes results to `part` as they finish."""
        out = OutputFile(part) if self.parallel.is_writer else NoOutput(part)
        written = []
        with out:
            write = ResultWriter(out, on_write=lambda result: written.append(
                {"id": result.id, "tokens": len(result.token_ids)}))
            # A retried batch: what its part file holds was written before the failure.
            parsed = (InputLine(number, error=error) if error is not None else parse_line(number, text)
                      for number, text, error in lines)
            todo = not_done(parsed, out.done)
            requests = to_requests(todo, self.llm.make_request, on_error=write)
            self.llm.generate(requests, on_result=write)
        return written if self.parallel.is_writer else []


def _has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


class Replica:
    """A model replica for Dataset.map_batches: tp x ep RankActors in one placement group."""

    def __init__(self, cfg: dict, parts_dir: str):
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        p = cfg["parallel"]
        size = p["tp"] * p["ep"]
        gpu = cfg["device"] != "cpu" and ray.cluster_resources().get("GPU", 0) > 0
        bundle = {"GPU": 1, "CPU": 1} if gpu else {"CPU": 1}
        self.group = placement_group([bundle] * size, strategy="PACK")
        ray.get(self.group.ready())
        actor = ray.remote(num_gpus=1 if gpu else 0, num_cpus=1)(RankActor)
        master_addr = ray.util.get_node_ip_address()
        master_port = ray.get(ray.remote(num_cpus=0)(_free_port).options(
            scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, 0)).remote())
        self.ranks = [actor.options(scheduling_strategy=PlacementGroupSchedulingStrategy(self.group, r))
                      .remote(cfg, r, size, master_addr, master_port) for r in range(size)]
        self.parts_dir = Path(parts_dir)

    def __call__(self, batch: dict) -> dict:
        import ray

        lines = [(int(n), str(t), str(e) or None)
                 for n, t, e in zip(batch["number"], batch["text"], batch["error"])]
        # The same batch (after a Ray retry) lands in the same part file, which remembers what is done.
        digest = hashlib.sha1("\n".join(f"{n}:{t}:{e}" for n, t, e in lines).encode()).hexdigest()[:16]
        part = str(self.parts_dir / f"part-{digest}.jsonl")
        written = ray.get([r.generate.remote(lines, part) for r in self.ranks])[0]
        return {"id": [json.dumps(w["id"]) for w in written], "tokens": [w["tokens"] for w in written]}


# ------------------------------------------------------------------------------------------ the job
def _raw_lines(path: str) -> list[tuple[int, str]]:
    """(line number, raw JSON text) per request; Parquet rows become JSON objects."""
    if path.endswith(".parquet"):
        import pyarrow.parquet as pq

        rows = pq.read_table(path).to_pylist()
        return [(i + 1, json.dumps(_without_nulls(row))) for i, row in enumerate(rows)]
    return list(nonblank_lines(path))


def _without_nulls(value):
    """A Parquet row as the JSON object it stands for: a column (or a field of a struct, such as a
    message's `channel`) that a row leaves empty reads back as null, and is left out instead."""
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def read_lines(path: str) -> list[tuple[InputLine, str]]:
    """Each request's line as the torchrun job reads it (parsed, errors naming the file, repeated ids
    flagged), with its raw text: what an actor is handed is (number, text, error)."""
    raw = _raw_lines(path)
    parsed = flag_repeated_ids(parse_line(number, text, path) for number, text in raw)
    return [(line, text) for line, (_, text) in zip(parsed, raw)]


def _check_parquet_output(store: ResultsStore) -> None:
    """A Parquet output is not read back (its ids are strings): a rerun reads the parts kept beside
    it, so an existing one must be this runtime's results with its parts folder still there."""
    import pyarrow.parquet as pq

    if not store.output.exists():
        return
    try:
        columns = set(pq.read_schema(store.output).names)
    except Exception as e:  # noqa: BLE001 - pyarrow raises several types for a file that is not Parquet
        raise ValueError(f"output={store.output} exists and is not a Parquet file ({e}); give another "
                         f"path, or move it away") from None
    if not {"id", "token_ids", "finish_reason"} <= columns:
        raise ValueError(f"output={store.output} is not a results file of this runtime (its columns are "
                         f"{', '.join(sorted(columns))}); give another path, or move it away")
    if not store.parts.is_dir():
        raise ValueError(f"output={store.output} holds an earlier job's results, but {store.parts}/, "
                         f"which a rerun reads, is gone; move {store.output} away to run again")


def _write_parquet(tmp: Path, lines) -> None:
    """The results as a Parquet table: native results in columns, the nested parts (a chat's
    messages, channels and tool calls; top_logprobs; an OpenAI Batch line's response and error) as
    JSON text, so that rows of any shape share one schema."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist([_parquet_row(json.loads(line)) for line in lines]), tmp)


PARQUET_COLUMNS = ("id", "token_ids", "logprobs", "text", "finish_reason", "line")


def _parquet_row(r: dict) -> dict:
    as_json = lambda value: None if value is None else json.dumps(value)  # noqa: E731
    row = {**{c: r.get(c) for c in PARQUET_COLUMNS}, "id": None if r.get("id") is None else str(r["id"])}
    row["chat"] = as_json({k: r[k] for k in ("messages", "channels", "tool_calls") if k in r}
                          if "channels" in r else None)
    row["top_logprobs"] = as_json(r.get("top_logprobs"))
    row["error"] = r.get("error") if isinstance(r.get("error"), str) else as_json(r.get("error"))
    row["custom_id"], row["response"] = r.get("custom_id"), as_json(r.get("response"))  # OpenAI Batch
    return row


def run(cfg: DictConfig) -> dict:
    import ray

    with clean_exit():  # bad arguments, paths or output files stop the job before Ray starts
        check_job_args(cfg, "input", "output")
        if cfg.parallel.get("attention_dp"):
            raise ValueError("parallel.attention_dp is for launch.batch (torchrun, Slurm): a Ray replica "
                             "schedules its requests on its first actor; use replicas= for data parallelism")
        parquet = str(cfg.output).endswith(".parquet")
        store = ResultsStore(cfg.output, readable_output=not parquet)
        if parquet:
            _check_parquet_output(store)
        lines = read_lines(str(cfg.input))
        done = store.recover(cfg.retry_errors)
    todo = [(line, text) for line, text in lines if line.key not in done]
    if not ray.is_initialized():
        ray.init(address=cfg.ray_address, num_cpus=cfg.ray_num_cpus, log_to_driver=True)
    progress = Progress(len(todo), enabled=cfg.progress, interval_s=cfg.progress_interval_s)
    start, tokens = time.perf_counter(), 0
    if todo:
        store.parts.mkdir(parents=True, exist_ok=True)
        # "" for no error: a column of strings and None would reach the actors as NaN for None
        dataset = ray.data.from_items([{"number": line.number, "text": text, "error": line.error or ""}
                                       for line, text in todo])
        container = OmegaConf.to_container(cfg, resolve=True)
        results = dataset.map_batches(Replica,
                                      fn_constructor_kwargs={"cfg": container, "parts_dir": str(store.parts)},
                                      batch_size=cfg.ray_batch_size,
                                      compute=ray.data.ActorPoolStrategy(size=cfg.replicas), num_cpus=0)
        for batch in results.iter_batches(batch_size=None):
            for n in batch["tokens"]:
                tokens += int(n)
                progress.update(int(n))
    progress.close()
    written = store.merge([line.key for line, _ in lines], write=_write_parquet if parquet else None)
    return {"requests": len(todo), "skipped": len(lines) - len(todo), "written": written,
            "tokens": tokens, "seconds": time.perf_counter() - start}


@hydra.main(version_base=None, config_path="../configs", config_name="ray_batch")
def main(cfg: DictConfig) -> None:
    with interrupted_quietly(f"finished results are in {parts_dir(cfg.output)}/; rerun with the same "
                             f"output to resume"):
        stats = run(cfg)
    print(f"done: {stats['requests']} requests ({stats['skipped']} already done), "
          f"{stats['written']} results in {cfg.output}, "
          f"{stats['tokens'] / max(stats['seconds'], 1e-9):.1f} tokens/s", file=sys.stderr)


if __name__ == "__main__":
    main()
