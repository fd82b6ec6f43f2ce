"""JSONL in, JSONL out, resumable.

Input lines are parsed one by one: a line that is not valid JSON becomes an error for that line
alone. Output lines are appended (and flushed to disk) as requests finish; on a rerun, ids already
in the output are skipped, and a last line cut short by a crash is dropped first.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterator

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
    """(line number, text) for each line of a JSONL file that is not blank; the text keeps its newline.
    The error for a missing file names `path` as given."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"input file {path} does not exist")
    with open(path, encoding="utf-8", errors="replace") as f:
        for number, text in enumerate(f, start=1):
            if text.strip():
                yield number, text


def read_input(path: str | os.PathLike) -> Iterator[InputLine]:
    path = Path(path)
    for number, text in nonblank_lines(path):
        yield parse_line(number, text, path)


def output_key(record: dict):
    if "id" in record and record["id"] is not None:
        return ("id", record["id"])
    return ("line", record.get("line"))


class OutputFile:
    """Append-only JSONL results; `done` holds the keys of requests already written."""

    def __init__(self, path: str | os.PathLike, recover: bool = True):
        """recover=False: another writer owns repairing the file and reading what is done."""
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.done: set = set()
        if recover and self.path.exists():
            self._recover()
        self._file = open(self.path, "a", encoding="utf-8")

    def _recover(self) -> None:
        data = self.path.read_bytes()
        complete = data[: data.rfind(b"\n") + 1]  # a partial last line is a write cut by a crash
        if len(complete) != len(data):
            with open(self.path, "r+b") as f:
                f.truncate(len(complete))
        for line in complete.decode("utf-8", errors="replace").splitlines():
            try:
                self.done.add(output_key(json.loads(line)))
            except (json.JSONDecodeError, AttributeError):
                continue  # not ours to judge; it stays in the file

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
