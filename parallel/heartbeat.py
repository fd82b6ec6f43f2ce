"""Which rank stopped? A heartbeat in the process group's key-value store answers it.

A collective that times out says only that a peer did not show up. So every rank runs a daemon
thread that writes the time into the store once a second; a rank that is killed, stopped or stuck
inside a C call stops writing (its threads stop with it), while ranks merely waiting in a collective
keep writing. When a collective fails, the ranks whose last beat is old are the ones to blame.

The thread is stopped and joined before the interpreter finalises (`stop`, registered with atexit):
a daemon thread caught inside the store's C++ call when Python tears down is ended by a forced unwind
through a noexcept frame, and the rank aborts ("terminate called without an active exception") after
its work is done.
"""

from __future__ import annotations

import atexit
import datetime
import threading
import time

import torch.distributed as dist

INTERVAL_S = 1.0
_state: dict = {}


def _key(rank: int) -> str:
    return f"gpt-oss/heartbeat/{rank}"


def start(rank: int, world_size: int) -> None:
    """Begin beating (once per process; a no-op without a process group)."""
    if _state or not dist.is_initialized():
        return
    # The default store is where torchrun's rendezvous lives; it outlives any single worker.
    store = dist.distributed_c10d._get_default_store()
    store.set_timeout(datetime.timedelta(seconds=5))
    stopping = threading.Event()

    def beat():
        while not stopping.is_set():
            try:
                store.set(_key(rank), repr(time.time()))
            except Exception:  # the store is gone: the job is ending anyway
                return
            stopping.wait(INTERVAL_S)

    thread = threading.Thread(target=beat, name="gpt-oss-heartbeat", daemon=True)
    _state.update(store=store, rank=rank, world_size=world_size, stopping=stopping, thread=thread)
    thread.start()
    atexit.register(stop)


def stop() -> None:
    """End the beating thread and wait for it (at most the store's timeout); idempotent."""
    if "thread" in _state:
        _state["stopping"].set()
        _state["thread"].join(timeout=6.0)


def silent_ranks(stale_after_s: float = 3 * INTERVAL_S) -> list[int] | None:
    """Ranks whose heartbeat is older than `stale_after_s` (or never came); None if unknown."""
    if not _state:
        return None
    store, now, silent = _state["store"], time.time(), []
    try:
        for r in range(_state["world_size"]):
            if r == _state["rank"]:
                continue
            if not store.check([_key(r)]) or now - float(store.get(_key(r)).decode()) > stale_after_s:
                silent.append(r)
    except Exception:
        return None
    return silent
