"""The warm-up runs before the CUDA graphs are captured, side by side, so that Triton compiles at once.

Each padded size a graph is captured for runs once outside the graph first: its Triton kernels
compile there (a kernel compiles once per specialisation: its tile constants, which follow the row
count, and which integer arguments are 1 or multiples of 16). On a machine whose Triton cache is
empty that compiling is most of the start-up (on an H100 at max_batch_size 1,024: 46-55 s to
capture with the cache empty, 5-9 s with it warm), and one size after another it uses one CPU core.
Triton's compiler passes and ptxas release the GIL, so `run_side_by_side` runs the sizes' warm-ups
on threads: the compiles of different sizes overlap, and threads that reach the same uncompiled
kernel wait for one compile of it (Triton's AsyncCompileMode, where this Triton has it) instead of
each compiling it again. Measured (docs/performance.md, session 22): 20b 54.7 -> 42.0 s, 120b 46.0
-> 45.9 s; within one size the kernels still compiled one after another, as its forward met them.
So on a GPU every size first runs once in a dry pass that executes nothing and only learns which
kernels the forwards launch, and all of those compile at once on threads
(runtime/kernels/compile_ahead.py); the warm-ups then find them compiled.

All threads launch on the caller's stream: the GPU runs their kernels one after another, and the
caching allocator hands memory freed by one warm-up to the next (it keeps freed blocks per stream).
The sizes running at once never add up to more rows than the largest of them, so the activations
in flight stay within what the KV sizing left for one step (engine._kv_pages). The warm-ups write
only into buffers the captures write again, and every row is padding, so their interleaving does
not matter; the captures that follow run each size again, from Triton's in-memory cache. Where the
forward holds collectives (tensor or expert parallelism) the ranks must launch them in the same
order, so there one thread runs the sizes, smallest first, on every rank, and no dry pass runs (its
capture would be the communicators' first use): cuda_graphs.warm_up_threads and compile_ahead_allowed.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import dataclasses
import os
import threading
import time
from typing import Callable

import torch

from runtime.kernels import compile_ahead

try:  # Triton 3.4 and later: concurrent launches of one uncompiled kernel share its compile
    from triton.runtime._async_compile import AsyncCompileMode
except ImportError:  # an older Triton: each thread compiles what it meets (correct, more CPU)
    AsyncCompileMode = None

MAX_THREADS = 8  # beyond this the threads mostly wait for the same kernels' compiles
MAX_COMPILE_THREADS = 32  # compiles side by side: a core each, up to this many


@dataclasses.dataclass(frozen=True)
class Report:
    """One `run_side_by_side`, timed: its wall seconds and each entry's (see there), and its
    compiling ahead (None: not done)."""
    wall_s: float
    seconds: dict[int, float]
    ahead: compile_ahead.Ahead | None = None

    def summary(self) -> dict:
        """For start-up reports: the wall time, the slowest entry, and the compiling ahead."""
        rows = max(self.seconds, key=self.seconds.get) if self.seconds else None
        summary = {"wall_s": self.wall_s, "slowest": rows, "slowest_s": self.seconds.get(rows, 0.0)}
        if self.ahead is not None:
            summary["ahead"] = self.ahead.summary()
        return summary


class RowBudget:
    """At most `rows` rows' warm-ups at once; one larger than the budget runs alone."""

    def __init__(self, rows: int):
        self.rows, self.in_flight = rows, 0
        self._changed = threading.Condition()

    def take(self, rows: int) -> None:
        with self._changed:
            self._changed.wait_for(lambda: self.in_flight == 0 or self.in_flight + rows <= self.rows)
            self.in_flight += rows

    def give(self, rows: int) -> None:
        with self._changed:
            self.in_flight -= rows
            self._changed.notify_all()


def _cpus() -> int:
    """The CPUs this process may run on (Slurm and taskset bind ranks to a few), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def compile_threads() -> int:
    """Threads for compiles side by side: one a CPU this process may use, up to MAX_COMPILE_THREADS."""
    return min(_cpus(), MAX_COMPILE_THREADS)


def run_side_by_side(bodies: dict[int, Callable[[], object]], device: torch.device,
                     threads: int | None = None, ahead: bool = True) -> Report:
    """Run `bodies[rows]()` once for every entry, several at a time on threads (at most `threads`,
    default the CPUs this process may use, up to MAX_THREADS), their rows at once within the
    largest entry's; the first error is raised once all have stopped. Every thread launches on the
    caller's current stream and device, under inference mode. On a GPU, and where `ahead`, the
    bodies' kernels compile first, all at once (compile_ahead). Returns the wall time (with the
    compiling ahead) and each entry's seconds (its compiles, and its waits for compiles another
    thread started; not its wait for the row budget), for start-up reports: where one entry's
    seconds come near the wall time, that entry set it."""
    start, seconds = time.perf_counter(), {}
    if not bodies:
        return Report(0.0, seconds)
    threads = max(1, min(threads or _cpus(), MAX_THREADS, len(bodies)))
    budget = RowBudget(max(bodies))
    stream = torch.cuda.current_stream(device) if device.type == "cuda" else None
    # Smallest first: on a machine's first run the small sizes, whose kernels (the MoE's GEMVs and
    # their probes) are the slowest to compile, start at once side by side; the large ones, which
    # need the row budget nearly alone, come last, when most of their kernels are compiled. Largest
    # first, 20b's decode warm-ups took 35.3 s cold on an H100, 17.3 s of it size 64 alone, which
    # started only once the large sizes had run one by one (docs/performance.md, session 23).
    order = sorted(bodies)

    def warm(rows: int) -> None:
        budget.take(rows)
        began = time.perf_counter()
        try:
            with contextlib.ExitStack() as scope:
                if stream is not None:  # a new thread starts on device 0's default stream
                    torch.cuda.set_device(stream.device_index)
                    scope.enter_context(torch.cuda.stream(stream))
                scope.enter_context(torch.inference_mode())  # thread-local, as the forward runs it
                bodies[rows]()
        finally:
            seconds[rows] = time.perf_counter() - began
            budget.give(rows)

    on_gpu = stream is not None  # nothing compiles on a CPU
    with concurrent.futures.ThreadPoolExecutor(threads) as pool, \
            concurrent.futures.ThreadPoolExecutor(max(threads, compile_threads())) as compilers:
        early = None
        if ahead and on_gpu:
            early = compile_ahead.compile_ahead([bodies[rows] for rows in order],
                                                torch.device("cuda", stream.device_index), compilers)
        shared_compiles = AsyncCompileMode is not None and on_gpu
        with AsyncCompileMode(compilers) if shared_compiles else contextlib.nullcontext():
            # each thread runs in a copy of this context, where the mode (a context variable) is set
            futures = [pool.submit(contextvars.copy_context().run, warm, rows) for rows in order]
            concurrent.futures.wait(futures)
    for future in futures:
        future.result()
    return Report(time.perf_counter() - start, seconds, early)
