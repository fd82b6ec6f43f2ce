"""Offline batch generation: JSONL requests in, JSONL results out, resumable.

    python -m launch.batch input=IN.jsonl output=OUT.jsonl [checkpoint=DIR] [dtype=bfloat16] [device=cuda]

Results are appended as requests finish; rerunning with the same output skips the ids already there.
A request that cannot run (bad JSON, an unknown field, a prompt over the context limit, ...) gets an
`error` line of its own and the others go on.
"""

from __future__ import annotations

import sys
import time

import hydra
from omegaconf import DictConfig
from tqdm import tqdm

from launch.common import build_llm, clean_exit
from runtime.engine import Result
from runtime.jsonl import OutputFile, read_input
from runtime.requests import RequestError


def run(cfg: DictConfig) -> dict:
    with clean_exit():  # a bad checkpoint, config or input path stops the job here, before any work
        llm = build_llm(cfg)
        lines = list(read_input(cfg.input))
    with OutputFile(cfg.output) as out:
        todo, seen = [], set()
        for line in lines:
            if line.key in out.done or line.key in seen:
                continue  # finished in an earlier run, or a repeated id (the first one wins)
            seen.add(line.key)
            todo.append(line)
        bar = tqdm(total=len(todo), unit="req", file=sys.stderr, disable=not cfg.progress, dynamic_ncols=True)
        stats = {"requests": len(todo), "errors": 0, "tokens": 0, "skipped": len(lines) - len(todo)}
        start = time.perf_counter()

        def write(result: Result, line_number: int | None = None) -> None:
            record = result.to_json()
            if result.id is None:
                record["line"] = line_number  # no usable id: the line number identifies it
            out.write(record)
            stats["errors"] += result.error is not None
            stats["tokens"] += len(result.token_ids)
            bar.update(1)
            bar.set_postfix(tok_s=f"{stats['tokens'] / (time.perf_counter() - start):.1f}", refresh=False)

        requests = []
        for line in todo:
            try:
                if line.error is not None:
                    raise RequestError(line.error)
                requests.append(llm.make_request(line.obj))
            except RequestError as e:
                write(Result(line.key[1] if line.key[0] == "id" else None, error=f"line {line.number}: {e}"),
                      line.number)
        llm.generate(requests, on_result=write)
        bar.close()
    stats["seconds"] = time.perf_counter() - start
    stats["tokens_per_s"] = stats["tokens"] / max(stats["seconds"], 1e-9)
    return stats


@hydra.main(version_base=None, config_path="../configs", config_name="batch")
def main(cfg: DictConfig) -> None:
    stats = run(cfg)
    print(f"done: {stats['requests']} requests ({stats['errors']} failed, {stats['skipped']} already done), "
          f"{stats['tokens']} tokens in {stats['seconds']:.1f} s, {stats['tokens_per_s']:.1f} tokens/s",
          file=sys.stderr)


if __name__ == "__main__":
    main()
