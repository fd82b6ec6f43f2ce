"""JSONL in, JSONL out, resumable.

Input lines are parsed one by one: a line that is not valid JSON becomes an error for that line
alone. Result lines are appended (and fsynced) as requests finish, and read back on a rerun: each must
be a result of this runtime, and only a last line cut short by a kill is dropped
(launch/results_store.py decides which files hold a job's results).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Iterator

from runtime import openai_batch
from runtime.requests import request_id


class InputLine:
    """One input line: its number (1-based), the parsed object, or the reason it could not be parsed."""

    def __init__(self, number: int, obj: Any = None, error: str | None = None):
        self.number, self.obj, self.error = number, obj, error

    @property
    def key(self):
        """What identifies the request in the output: its id, or the line number when it has none."""
        rid = request_id(self.obj)
        return ("line", self.number) if rid is None else ("id", rid)


def parse_line(number: int, text: str, path: str | os.PathLike | None = None) -> InputLine:
    """One input line parsed. Text that is not JSON becomes the line's error, which names the place as
    `path:number`, or as `line number` where the line came without its file (a Ray batch)."""
    try:
        return InputLine(number, json.loads(text))
    except json.JSONDecodeError as e:
        where = f"{path}:{number}" if path is not None else f"line {number}"
        return InputLine(number, error=f"{where}: not valid JSON ({e.msg} at column {e.colno})")


def nonblank_lines(path: str | os.PathLike) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a JSONL file that is not blank, without its line end (so
    that a JSON error's column counts within the line). The error for a missing file names `path` as
    given."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text.rstrip("\r\n")


def read_input(path: str | os.PathLike) -> Iterator[InputLine]:
    path = Path(path)
    for number, text in nonblank_lines(path):
        yield parse_line(number, text, path)


FINISH_REASONS = ("stop", "length", "error")
# Every result line starts so (Result.to_json puts the id first): how a line cut short by a crash is told
# from someone else's text.
RESULT_START = '{"id": '


class NotResults(ValueError):
    """A file taken for the job's results holds something else; the message names the file and line."""


def output_key(record: dict):
    if openai_batch.is_record(record):
        return openai_batch.record_key(record)
    if "id" in record and record["id"] is not None:
        return ("id", record["id"])
    return ("line", record.get("line"))


def is_result(record: Any) -> bool:
    """Whether a parsed output line is one of this runtime's results (see runtime.engine.Result, and
    runtime/openai_batch.py for OpenAI Batch output lines)."""
    if openai_batch.is_record(record):
        return True
    if not isinstance(record, dict) or "id" not in record:
        return False
    rid, line = record["id"], record.get("line")
    has_key = (request_id(record) is not None
               or (rid is None and isinstance(line, int) and not isinstance(line, bool)))
    return (has_key and isinstance(record.get("token_ids"), list)
            and record.get("finish_reason") in FINISH_REASONS)


@dataclasses.dataclass(frozen=True)
class StoredResult:
    """Where one result line lies in its file: bytes [start, end), newline included."""
    key: tuple
    start: int
    end: int
    failed: bool  # an error result (what retry_errors runs again)


@dataclasses.dataclass
class ResultLines:
    """A results file read through: its whole lines, and where a cut last line (if any) begins."""
    path: Path
    results: list[StoredResult]
    whole_bytes: int  # bytes up to the last newline; a cut last line follows

    @property
    def keys(self) -> set:
        return {r.key for r in self.results}


def read_result_lines(path: str | os.PathLike) -> ResultLines:
    """Every line of `path` checked to be a result, without changing the file. A last line without its
    newline is a write cut short by a kill when it starts as a result does; anything else (a foreign line
    anywhere) raises NotResults naming the line, so that no file but the job's own is ever changed."""
    path = Path(path)
    results, offset = [], 0
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.endswith(b"\n"):
                text = raw.decode("utf-8", errors="replace")
                if not (text.startswith(RESULT_START) or RESULT_START.startswith(text)):
                    raise NotResults(f"{path}:{number} is not a result of this runtime "
                                     f"(found {_preview(text)} without a final newline)")
                break
            if raw.strip():
                try:
                    record = json.loads(raw)
                except json.JSONDecodeError:
                    record = None
                if not is_result(record):
                    raise NotResults(f"{path}:{number} is not a result of this runtime "
                                     f"(found {_preview(raw.decode('utf-8', errors='replace'))})")
                results.append(StoredResult(output_key(record), offset, offset + len(raw),
                                            failed(record)))
            offset += len(raw)
    return ResultLines(path, results, offset)


def failed(record: dict) -> bool:
    """Whether a result line reports a request that did not run (what retry_errors runs again)."""
    if openai_batch.is_record(record):
        return openai_batch.record_failed(record)
    return record.get("error") is not None


def _preview(text: str, width: int = 60) -> str:
    text = text.strip()
    return repr(text if len(text) <= width else text[:width] + "...")


class OutputFile:
    """Append-only JSONL results; `done` holds the keys of requests already written."""

    def __init__(self, path: str | os.PathLike, recover: bool = True):
        """recover=True: read what `path` holds (NotResults if it is not results) and drop a cut last
        line; False: another writer owns that, and `done` starts empty."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set = set()
        if recover and self.path.exists():
            stored = read_result_lines(self.path)
            truncate_cut_line(stored)
            self.done = stored.keys
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict) -> None:
        # One write call per line, then fsync: a kill leaves whole lines plus at most one partial line.
        self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())
        self.done.add(output_key(record))

    def close(self) -> None:
        self._file.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def truncate_cut_line(stored: ResultLines) -> None:
    """Drop the cut last line `read_result_lines` found, if any: the only change made to a results file
    in place (whole lines are only ever appended)."""
    if stored.path.stat().st_size > stored.whole_bytes:
        with open(stored.path, "r+b") as f:
            f.truncate(stored.whole_bytes)
            f.flush()
            os.fsync(f.fileno())


class NoOutput:
    """Where a rank that does not write sends its results: nowhere."""

    def __init__(self, path: str | os.PathLike):
        self.path, self.done = Path(path), set()

    def write(self, record: dict) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        pass
