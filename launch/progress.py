"""Progress for long jobs: requests done, tokens/s and time left.

A progress bar on a terminal; in a log file (Slurm, Ray, nohup) a plain line every `interval_s`
seconds instead, since a bar's carriage returns make a log unreadable.
"""

from __future__ import annotations

import sys
import time

from tqdm import tqdm


class Progress:
    def __init__(self, total: int, enabled: bool = True, interval_s: float = 30.0, stream=sys.stderr):
        self.total, self.done, self.tokens = total, 0, 0
        self.enabled, self.interval_s, self.stream = enabled, interval_s, stream
        self.start = self.last_line = time.perf_counter()
        self.bar = tqdm(total=total, unit="req", file=stream, dynamic_ncols=True) \
            if enabled and stream.isatty() else None

    def update(self, tokens: int) -> None:
        self.done += 1
        self.tokens += tokens
        rate = self.tokens / max(time.perf_counter() - self.start, 1e-9)
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(tok_s=f"{rate:.1f}", refresh=False)
        elif self.enabled and (time.perf_counter() - self.last_line >= self.interval_s
                               or self.done == self.total):
            self.last_line = time.perf_counter()
            print(self.line(), file=self.stream, flush=True)

    def line(self) -> str:
        elapsed = time.perf_counter() - self.start
        left = (self.total - self.done) * elapsed / self.done if self.done else float("nan")
        return (f"progress: {self.done}/{self.total} requests, "
                f"{self.tokens / max(elapsed, 1e-9):.1f} tokens/s, "
                f"elapsed {elapsed:.0f} s, ETA {left:.0f} s")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
