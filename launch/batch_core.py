"""What both batch jobs mean by a line and by a result: input lines into requests, results into records.

`launch.batch` (torchrun, Slurm) and `launch.ray_batch` (Ray Data) differ in how they spread the work
and where the output goes, not in which lines are skipped, how a line that cannot run is reported, or
what a result's output record is: that is decided here, once. It lives in launch/ beside the two jobs
rather than in runtime/jsonl.py because it speaks the engine's language (requests, Results), while
jsonl.py knows only the file format (parsing a line, the output's keys, appending records).
"""

from __future__ import annotations

from typing import Callable, Iterable, Iterator

from runtime import openai_batch
from runtime.engine import Result
from runtime.jsonl import InputLine, NoOutput, OutputFile, output_key
from runtime.requests import Request, RequestError


def not_done(lines: Iterable[InputLine], done: set) -> Iterator[InputLine]:
    """The lines whose key is not in `done` (finished in an earlier run). Asked line by line as they
    are consumed, so a key written meanwhile (an earlier line's error result) counts as done too."""
    return (line for line in lines if line.key not in done)


def flag_repeated_ids(lines: Iterable[InputLine]) -> Iterator[InputLine]:
    """The lines, each id's second and later lines turned into errors of their own (reported by line
    number, since the id is its first line's): every line gets exactly one result, and no result
    stands for two requests."""
    first_line = {}
    for line in lines:
        first = first_line.setdefault(line.key, line.number)
        if first != line.number:
            line = InputLine(line.number, error=f"id {line.key[1]!r} is already used by line {first}; "
                                                f"ids must be unique (this line did not run)")
        yield line


def error_result(line: InputLine, error: Exception) -> Result:
    """The result of a line that cannot run: its id when it has a usable one, the reason after its number
    (an OpenAI Batch line's is written in OpenAI's shape)."""
    reply = openai_batch.reply_settings(line.obj) if openai_batch.is_openai(line.obj) else None
    return Result(line.key[1] if line.key[0] == "id" else None, error=f"line {line.number}: {error}",
                  openai=reply)


def to_requests(lines: Iterable[InputLine], make_request: Callable[[object], Request],
                on_error: Callable[[Result, int], None]) -> list[Request]:
    """The engine's requests for `lines`. A line that cannot become one (not JSON, a bad field, ...)
    goes to `on_error(result, line_number)` at once, so its error is written before generation starts."""
    requests = []
    for line in lines:
        try:
            if line.error is not None:
                raise RequestError(line.error)
            requests.append(make_request(line.obj))
        except RequestError as e:
            on_error(error_result(line, e), line.number)
    return requests


def output_record(result: Result, line_number: int | None = None) -> dict:
    """The output line of a result, as a JSON object: OpenAI's batch output line for an OpenAI Batch
    line, else the native record."""
    if result.openai is not None:
        return openai_batch.output_record(result, line_number)
    record = result.to_json()
    if result.id is None:
        record["line"] = line_number  # no usable id: the line number identifies it
    return record


class ResultWriter:
    """The engine's on_result (and to_requests' on_error): each Result becomes its record, is appended
    to `out` and counted; `on_write(result)` follows each one (progress, a list of what was done).

    A key already in `out` is not written again, so the record written first stays: in a Ray batch
    retried after a failure. The jobs hand it no other repeats: they skip what is done before they
    start, and `flag_repeated_ids` gives a repeated id's later lines keys of their own."""

    def __init__(self, out: OutputFile | NoOutput, on_write: Callable[[Result], None] = lambda result: None):
        self.out, self.on_write = out, on_write
        # tokens: generated; prompt and cached prompt tokens (the prefix cache's share) for reports
        self.counts = {"written": 0, "errors": 0, "tokens": 0, "prompt_tokens": 0, "cached_prompt_tokens": 0}

    def __call__(self, result: Result, line_number: int | None = None) -> None:
        record = output_record(result, line_number)
        if output_key(record) not in self.out.done:
            self.out.write(record)
        self.counts["written"] += 1
        self.counts["errors"] += result.error is not None
        self.counts["tokens"] += len(result.token_ids)
        self.counts["prompt_tokens"] += result.prompt_tokens
        self.counts["cached_prompt_tokens"] += result.cached_tokens
        self.on_write(result)
