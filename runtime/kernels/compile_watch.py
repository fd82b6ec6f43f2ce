"""`CompileWatch`: the Triton compiles that happen while it is on, each kernel's name and seconds.

A kernel compiles the first time this process launches it with a new specialisation (its constants,
which follow the step's shape, and the classes of its integer arguments). Start-up (the CUDA graphs'
warm-ups, a benchmark's warm-up requests) should meet every one a run needs; one met later compiles
in the middle of the run, seconds on a machine whose Triton cache is empty, and a benchmark's timed
run then measures the compiler. The throughput benchmark watches its timed run and reports what
compiled there (launch/throughput.py), so such a run is visible rather than merely slow.

It uses Triton's compile hooks (`triton.knobs.runtime.jit_cache_hook`, called before a compile, and
`jit_post_compile_hook`, after; Triton 3.4 and later): a compile is timed from one to the other on
the thread that launched it. A compile served from Triton's disk cache counts too, in milliseconds.
Under Triton's interpreter (CPU) nothing compiles. Hooks already installed keep being called.
"""

from __future__ import annotations

import collections
import threading
import time

try:
    from triton import knobs
except ImportError:  # Triton before 3.4: no hooks, nothing is watched
    knobs = None


class CompileWatch:
    """Context manager: `events` lists (kernel name, seconds) of each compile while it is on."""

    def __init__(self):
        self.events: list[tuple[str, float]] = []
        self._lock = threading.Lock()
        self._started = threading.local()  # per thread: compile key -> start time
        self._saved = None

    @property
    def available(self) -> bool:
        """Whether this Triton has the hooks (else `events` stays empty whatever compiles)."""
        return knobs is not None

    def _before(self, *, key, fn, **kwargs):
        self._started.__dict__.setdefault("times", {})[str(key)] = time.perf_counter()
        previous = self._saved[0]
        return previous(key=key, fn=fn, **kwargs) if previous else None  # truthy would skip the compile

    def _after(self, *, key, fn, **kwargs):
        start = getattr(self._started, "times", {}).pop(str(key), None)
        # A compile finished on another thread (Triton's AsyncCompileMode) has no start here: counted, 0 s.
        seconds = time.perf_counter() - start if start is not None else 0.0
        with self._lock:  # the kernel's own name (Triton gives its qualified one: f.<locals>.kernel)
            self.events.append((fn.name.rsplit(".", 1)[-1], seconds))
        previous = self._saved[1]
        return previous(key=key, fn=fn, **kwargs) if previous else None

    def __enter__(self) -> CompileWatch:
        if knobs is not None:
            self._saved = knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook
            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._before, self._after
        return self

    def __exit__(self, *exc) -> None:
        if knobs is not None:
            knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = self._saved

    def summary(self) -> dict | None:
        """For reports: how many compiles, their seconds, the count by kernel and the seconds by kernel,
        most first (None: not watched). Compiles on threads side by side (the graphs' warm-ups) each
        count their own wait, so their seconds add up to more than the wall time."""
        if not self.available:
            return None
        with self._lock:
            events = list(self.events)
        seconds = collections.Counter()
        for name, s in events:
            seconds[name] += s
        return {"count": len(events), "seconds": sum(s for _, s in events),
                "kernels": dict(collections.Counter(name for name, _ in events).most_common()),
                "seconds_by_kernel": {name: round(s, 3) for name, s in seconds.most_common()}}
