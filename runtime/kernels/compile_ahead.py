"""Compiling ahead: every Triton kernel some step bodies launch, compiled side by side before any runs.

Start-up runs each CUDA graph's step once before capturing it (runtime/warm_up.py). On a machine
whose Triton cache is empty its kernels compile there, one after another as the forward meets them:
31 s of 20b's start-up on an H100 at max_batch_size 1,024, against 6 s with the cache warm
(docs/performance.md, session 24). The compiles do not depend on each other, and Triton's compiler
passes and ptxas mostly run without the GIL (two threads compiled six MoE GEMMs 1.7x faster than one
on two cores), so they can run at once on threads, once their specialisations are known.

`compile_ahead` learns them from a dry pass. The bodies run once inside a CUDA graph capture that is
then dropped, so nothing they launch executes: without it their torch ops would read whatever the
kernels that did not run left behind, and an index out of range there is a device assert. Meanwhile
Triton's `jit_cache_hook` sees every launch that would compile, records its specialisation and skips
it (a truthy answer: no compile, no launch). The recorded specialisations then compile on the
executor's threads (`JITFunction.preload`, Triton's own way to compile a specialisation it
serialised) into the in-memory cache a launch looks in, so the warm-ups that follow find them there.

Inside the dry pass `active()` is true, for code that must not run inside a capture on its first
call (a probe that syncs, a buffer made once per device): there it takes its captured step's branch
and leaves the one-time work to the warm-ups. A dry pass that fails (a body that cannot be captured)
still compiles what it recorded and reports the error; the warm-ups compile the rest, as they would
without it.
"""

from __future__ import annotations

import concurrent.futures
import contextvars
import dataclasses
import time
from typing import Callable, Iterable

import torch

from runtime.kernels.compile_watch import knobs  # None: a Triton before 3.4, without compile hooks
from runtime.options import options

_active = contextvars.ContextVar("compile_ahead_dry_pass", default=False)


def active() -> bool:
    """Whether this thread is in compile_ahead's dry pass (launches are recorded, nothing runs)."""
    return _active.get()


@dataclasses.dataclass(frozen=True)
class Ahead:
    """One compile_ahead: the specialisations its dry pass found (`failed` of them did not compile:
    the warm-up that launches one meets the error again, with its context), the dry pass's seconds,
    the compiles' wall seconds, and why the dry pass stopped early (None: it did not)."""
    kernels: int
    failed: int
    dry_s: float
    compile_s: float
    error: str | None = None

    def summary(self) -> dict:
        return dataclasses.asdict(self)


def enabled() -> bool:
    """Whether compile_ahead does anything here: this Triton has compile hooks and the switch is on
    (GPT_OSS_COMPILE_AHEAD)."""
    return knobs is not None and options.compile_ahead


def prepare_cublas(device: torch.device) -> None:
    """This thread's cuBLAS handles and the current stream's workspaces, made now: before a capture
    on that stream, which would otherwise make them inside the graph."""
    a = torch.zeros(16, 16, dtype=torch.bfloat16, device=device)
    torch.mm(a, a)  # the plain GEMM (the LM head) and the one with a bias (cuBLASLt: projections)
    torch.nn.functional.linear(a, a, a[0])


def capture_without_running(bodies: Iterable[Callable[[], object]], device: torch.device) -> None:
    """Each body once, in order, inside one CUDA graph capture that is dropped unlaunched (and, where
    torch can, never instantiated): the device runs none of it. Its temporaries come from the capture's
    own memory pool, reused from one body to the next, and given back to the device after it."""
    try:
        graph = torch.cuda.CUDAGraph(keep_graph=True)  # capture_end then skips instantiating it
    except TypeError:  # a torch without keep_graph
        graph = torch.cuda.CUDAGraph()
    stream = torch.cuda.Stream(device)
    stream.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(stream), torch.inference_mode():
        prepare_cublas(device)
        # thread-local: other threads' CUDA calls (a module loaded elsewhere) do not end the capture
        graph.capture_begin(capture_error_mode="thread_local")
        try:
            for body in bodies:
                body()
        finally:
            graph.capture_end()
    torch.cuda.current_stream(device).wait_stream(stream)
    del graph
    torch.cuda.empty_cache()  # the capture's pool, free now: back to the device for the warm-ups


def compile_ahead(bodies: Iterable[Callable[[], object]], device: torch.device,
                  executor: concurrent.futures.Executor,
                  dry_run: Callable = capture_without_running) -> Ahead | None:
    """Compile every Triton kernel specialisation `bodies` would launch and this process has not
    compiled yet, on `executor`'s threads, before any body runs; returns when all are done (None, at
    once: this Triton has no compile hooks, or the switch is off, GPT_OSS_COMPILE_AHEAD=0). `dry_run`
    runs the bodies without their launches executing (tests replace the capture)."""
    if not enabled():
        return None
    found: dict[tuple[int, str], tuple[object, str]] = {}

    def record(*, key, fn, compile, **_):
        found.setdefault((id(fn.jit_function), str(key)), (fn.jit_function, compile["specialization_data"]))
        return True  # skip it: no compile, no launch

    began, error = time.perf_counter(), None
    saved, knobs.runtime.jit_cache_hook = knobs.runtime.jit_cache_hook, record
    dry = _active.set(True)
    try:
        dry_run(bodies, device)
    except Exception as failure:  # noqa: BLE001  (the warm-ups then compile what was not found)
        error = f"{type(failure).__name__}: {failure}"
    finally:
        _active.reset(dry)
        knobs.runtime.jit_cache_hook = saved  # a CompileWatch's again: it times the compiles below
    dry_s, began = time.perf_counter() - began, time.perf_counter()
    index = (device.index if device.index is not None else torch.cuda.current_device()) \
        if device.type == "cuda" else None

    def build(kernel, data: str) -> None:
        if index is not None:  # a new thread's current device is the first GPU
            torch.cuda.set_device(index)
        kernel.preload(data)

    futures = [executor.submit(build, kernel, data) for kernel, data in found.values()]
    failed = sum(future.exception() is not None for future in futures)  # waits for each
    return Ahead(len(found), failed, dry_s, time.perf_counter() - began, error)
