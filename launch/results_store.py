"""Where a batch job's results live, and the rules that keep a user's files safe.

While a job runs, each writer (a torchrun or Slurm replica's first rank, a Ray batch) appends its
results to a file of its own in OUTPUT.parts/, one fsynced line per result: no two processes ever
append to one file, which NFS and Lustre do not make safe. When every request of the input has a
result, the parts and any earlier OUTPUT are merged in input order into a temporary file that is
renamed over OUTPUT in one step; a JSONL output then holds everything (a rerun reads it back) and the
parts are removed, while beside a Parquet output (written by `launch.ray_batch`) the parts stay, as
what a rerun reads.

Nothing but the job's own results is ever changed. Before any work OUTPUT and its parts must hold only
results of this runtime (runtime/jsonl.py `is_result`), or the job is refused; the one line ever dropped
is a result cut short by a kill; `retry_errors` rewrites the files without their error results (a
temporary file renamed into place), so that those requests run again.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Iterable

from runtime.jsonl import NotResults, OutputFile, ResultLines, read_result_lines, truncate_cut_line

MERGE_LOCK = ".merging"  # in OUTPUT.parts/: made exclusively by the one writer that merges


def check_paths(input_path: str | os.PathLike, output_path: str | os.PathLike) -> None:
    """The paths a job is given, checked before anything is loaded: ValueError or FileNotFoundError."""
    inp, out = Path(input_path), Path(output_path)
    if not inp.exists():
        raise FileNotFoundError(f"input file {inp} does not exist")
    if not inp.is_file():
        raise ValueError(f"input={inp} is not a file")
    if out.is_dir():
        raise ValueError(f"output={out} is a directory; name the results file to write, "
                         f"e.g. output={out / 'results.jsonl'}")
    if out.resolve() == inp.resolve() or (out.exists() and os.path.samefile(out, inp)):
        raise ValueError(f"output={out} is the input file; results go to a file of their own")
    parts = parts_dir(out)
    if parts.exists() and not parts.is_dir():
        raise ValueError(f"{parts} is in the way: the job keeps its unfinished results in a folder of "
                         f"that name; move it away")


def parts_dir(output_path: str | os.PathLike) -> Path:
    return Path(f"{output_path}.parts")


class ResultsStore:
    """OUTPUT and OUTPUT.parts/ as one store of results. `readable_output`: the merged output is JSONL,
    read back on a rerun (a Parquet one is not: its parts are kept instead)."""

    def __init__(self, output_path: str | os.PathLike, readable_output: bool = True):
        self.output, self.parts = Path(output_path), parts_dir(output_path)
        self.readable_output = readable_output

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("*.jsonl")) if self.parts.is_dir() else []

    def _files(self) -> list[Path]:
        """The files holding results: the output when it is read back (first: it wins), then the parts."""
        merged = [self.output] if self.readable_output and self.output.exists() else []
        return merged + self._part_files()

    def _read(self, path: Path) -> ResultLines:
        try:
            return read_result_lines(path)
        except NotResults as e:
            raise NotResults(f"{e}. output= must be this job's results or a new file: give another "
                             f"path, or move {path} away") from None

    def recover(self, retry_errors: bool = False) -> set:
        """Check every file (NotResults for a foreign one), drop cut last lines, with `retry_errors`
        drop error results, and return the keys of the results kept. Run by one process, before any
        writer starts."""
        stored = [self._read(path) for path in self._files()]  # every file checked before one changes
        for lines in stored:
            truncate_cut_line(lines)
            if retry_errors and any(r.failed for r in lines.results):
                _rewrite(lines.path, lines.path, [r for r in lines.results if not r.failed])
        (self.parts / MERGE_LOCK).unlink(missing_ok=True)  # left by a merge that was killed
        return {r.key for lines in stored for r in lines.results if not (retry_errors and r.failed)}

    def done(self) -> set:
        """The keys of the results written so far, without changing anything (other writers may be
        appending: a line they are writing counts once it is whole)."""
        return set().union(*(self._read(path).keys for path in self._files()))

    def part(self, name: str) -> OutputFile:
        """A writer's own part file, appended to (recover() has repaired it)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        return OutputFile(self.parts / name, recover=False)

    def merge(self, order: Iterable,
              write: Callable[[Path, Iterable[bytes]], None] | None = None) -> int | None:
        """Every result into OUTPUT, in the order of the keys in `order` (results of keys not there
        after them, as found), one line per key (a JSONL output's own line first, then the parts by
        name). `write(tmp, lines)` writes another format. Returns the number of results in OUTPUT, or
        None when another writer is merging."""
        if self.readable_output and self.output.exists() and not self._part_files():
            return len(self.done())  # nothing new since the last merge
        self.parts.mkdir(parents=True, exist_ok=True)
        try:
            os.close(os.open(self.parts / MERGE_LOCK, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            return None
        where = {}
        for lines in map(self._read, self._files()):
            for r in lines.results:
                where.setdefault(r.key, (lines.path, r))
        position = {key: i for i, key in enumerate(order)}
        keys = sorted(where, key=lambda key: position.get(key, len(position)))  # stable: the rest as found
        _rewrite(self.output, None, [where[key] for key in keys], write)
        if self.readable_output:  # everything is in the output now
            for part in self._part_files():
                part.unlink()
        (self.parts / MERGE_LOCK).unlink()
        if self.readable_output:
            try:
                self.parts.rmdir()
            except OSError:  # something else was put there: not ours to remove
                pass
        return len(keys)


def _rewrite(target: Path, source: Path | None, results: list, write=None) -> None:
    """`target` replaced in one rename by the lines of `results`: StoredResults of `source`, or
    (path, StoredResult) pairs. The temporary file is fsynced first and the folder after, so a crash
    leaves the old file or the new one, never a mix."""
    tmp = target.with_name(f".{target.name}.tmp")
    handles: dict[Path, object] = {}
    try:
        def lines():
            for item in results:
                path, r = (source, item) if source is not None else item
                if path not in handles:
                    handles[path] = open(path, "rb")
                f = handles[path]
                f.seek(r.start)
                yield f.read(r.end - r.start)

        if write is None:
            with open(tmp, "wb") as out:
                out.writelines(lines())
        else:
            write(tmp, lines())
    finally:
        for f in handles.values():
            f.close()
    _fsync(tmp)  # on disk before the rename makes it the file
    os.replace(tmp, target)
    _fsync(target.parent)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
