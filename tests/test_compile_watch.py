"""runtime/kernels/compile_watch.py: Triton's compiles while the watch is on, timed and named."""

from __future__ import annotations

import threading
import time

import pytest
import torch

from runtime.kernels.compile_watch import CompileWatch, knobs

pytestmark = pytest.mark.skipif(knobs is None, reason="a Triton without compile hooks")


class _Fn:  # what Triton's hooks get as `fn` (JitFunctionInfo): the kernel's name
    def __init__(self, name):
        self.name = name


def _compile(name: str, key: str, seconds: float = 0.0) -> None:
    """What Triton's JITFunction does around one compile: the cache hook, the compile, the post hook."""
    hook_args = dict(key=key, repr=name, fn=_Fn(name), compile={}, is_manual_warmup=False,
                     already_compiled=False)
    if knobs.runtime.jit_cache_hook:  # Triton calls a hook only where one is set
        assert knobs.runtime.jit_cache_hook(**hook_args) is None  # a truthy answer would skip the compile
    time.sleep(seconds)
    if knobs.runtime.jit_post_compile_hook:
        knobs.runtime.jit_post_compile_hook(**hook_args)


def test_the_watch_times_each_compile_on_its_thread_and_restores_the_hooks():
    calls = []
    before = lambda **kw: calls.append(("before", kw["fn"].name))  # noqa: E731
    after = lambda **kw: calls.append(("after", kw["fn"].name))  # noqa: E731
    knobs.runtime.jit_cache_hook, knobs.runtime.jit_post_compile_hook = before, after
    try:
        with CompileWatch() as watch:
            _compile("_slow_kernel", "k1", seconds=0.1)
            # two threads compiling at once: each compile's time is its own thread's
            threads = [threading.Thread(target=_compile, args=(f"_kernel_{i}", f"k{i}", 0.02 * i))
                       for i in (2, 3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            _compile("_slow_kernel", "k4")
        assert knobs.runtime.jit_cache_hook is before and knobs.runtime.jit_post_compile_hook is after
    finally:
        knobs.runtime.jit_cache_hook = knobs.runtime.jit_post_compile_hook = None
    # the hooks installed before the watch were still called, in order
    assert calls[:2] == [("before", "_slow_kernel"), ("after", "_slow_kernel")] and len(calls) == 8
    seconds = dict(watch.events[:1])
    assert 0.1 <= seconds["_slow_kernel"] < 1.0
    by_name = {}
    for name, s in watch.events:
        by_name.setdefault(name, []).append(s)
    assert 0.04 <= by_name["_kernel_2"][0] < 0.06 + 1.0 and by_name["_kernel_3"][0] >= 0.06
    summary = watch.summary()
    assert summary["count"] == 4 and summary["kernels"] == {"_slow_kernel": 2, "_kernel_2": 1, "_kernel_3": 1}
    assert summary["seconds"] == pytest.approx(sum(s for _, s in watch.events))
    assert list(summary["seconds_by_kernel"])[0] == "_slow_kernel"  # most seconds first
    assert summary["seconds_by_kernel"]["_kernel_3"] == pytest.approx(by_name["_kernel_3"][0], abs=1e-3)
    _compile("_after_the_watch", "k5")  # hooks gone: nothing more recorded
    assert watch.summary()["count"] == 4


def test_a_compile_finished_on_another_thread_counts_with_no_time():
    with CompileWatch() as watch:  # Triton's AsyncCompileMode: launched on one thread, finished on another
        hook_args = dict(repr="", compile={}, is_manual_warmup=False, already_compiled=False)
        knobs.runtime.jit_cache_hook(key="k", fn=_Fn("_async"), **hook_args)
        done = threading.Thread(target=knobs.runtime.jit_post_compile_hook,
                                kwargs=dict(key="k", fn=_Fn("_async"), **hook_args))
        done.start()
        done.join()
    assert watch.events == [("_async", 0.0)]


def test_a_kernel_defined_in_a_function_is_named_by_its_own_name():
    with CompileWatch() as watch:  # Triton's hooks get the qualified name (__qualname__)
        _compile("test_x.<locals>._local_kernel", "k")
    assert [name for name, _ in watch.events] == ["_local_kernel"]


@pytest.mark.gpu
def test_a_new_specialisation_compiles_inside_the_watch_once():
    import triton
    import triton.language as tl

    @triton.jit
    def _watched_kernel(x_ptr, N: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, N), tl.arange(0, N).to(tl.float32))

    x = torch.full((64,), float("nan"), device="cuda")
    width = 32  # a kernel defined here: its first launch compiles (or loads from Triton's disk cache)
    with CompileWatch() as watch:
        _watched_kernel[(1,)](x, N=width)
        _watched_kernel[(1,)](x, N=width)  # the same specialisation: no second compile
    torch.cuda.synchronize()
    assert [name for name, _ in watch.events] == ["_watched_kernel"] and watch.events[0][1] > 0
    assert torch.equal(x[:width].cpu(), torch.arange(width, dtype=torch.float32))


@pytest.mark.gpu
def test_a_step_count_compiles_once_for_every_value():
    """runtime/kernels/step_kernel.py: 17, 16 and 1 rows (Triton's three classes of an integer: other,
    a multiple of 16, one) run one compile of the RMSNorm kernel, and each gives the reference's rows."""
    from runtime.kernels.rmsnorm import add_rms_norm
    from runtime.kernels.rmsnorm_triton import add_rms_norm_triton

    gain = torch.randn(2880, device="cuda")
    with CompileWatch() as watch:
        for rows in (17, 16, 1):
            x, delta = (torch.randn(rows, 2880, device="cuda", dtype=torch.bfloat16) for _ in range(2))
            residual, normed = add_rms_norm_triton(x, delta, gain, 1e-5,
                                                   residual_out=torch.full_like(x, float("nan")),
                                                   normed_out=torch.full_like(x, float("nan")))
            want_residual, want_normed = add_rms_norm(x, delta, gain, 1e-5)
            assert torch.equal(residual, want_residual)  # as tests/test_rmsnorm.py: one add, one rounding
            torch.testing.assert_close(normed, want_normed, atol=0, rtol=2 ** -7)  # one bf16 ulp
    # at most one: none where an earlier test of this process compiled it already
    assert watch.summary()["kernels"].get("_add_rms_norm_kernel", 0) <= 1
