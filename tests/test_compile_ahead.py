"""runtime/kernels/compile_ahead.py: a dry pass learns which kernels the bodies launch, skips them, and
they compile side by side on an executor before any body runs.

On CPU the dry pass's capture is replaced by a plain call of the bodies, which "launch" by calling
Triton's cache hook as JITFunction.run does on a miss; on a GPU a real kernel compiles ahead without
running, inside a capture beside a torch op that would fault on the kernel's unwritten output."""

from __future__ import annotations

import concurrent.futures
import os
import threading
import types

import pytest
import torch

from runtime.kernels import compile_ahead
from runtime.kernels.compile_watch import CompileWatch, knobs
from runtime.options import options

pytestmark = pytest.mark.skipif(knobs is None, reason="a Triton without compile hooks")


class _Kernel:
    """What the hook's `fn.jit_function` is (a JITFunction): preload compiles one specialisation."""

    def __init__(self, name: str, fails: bool = False):
        self.name, self.fails, self.preloaded = name, fails, []

    def preload(self, data: str) -> None:
        self.preloaded.append((data, threading.get_ident()))
        if self.fails:
            raise RuntimeError(f"{self.name} does not compile")


def _launch(kernel: _Kernel, key: str) -> None:
    """What JITFunction.run does for a specialisation not in its cache: ask the hook, whose truthy
    answer means compile nothing and launch nothing."""
    skipped = knobs.runtime.jit_cache_hook(
        key=key, repr=kernel.name, fn=types.SimpleNamespace(name=kernel.name, jit_function=kernel),
        compile={"key": key, "specialization_data": f"{kernel.name}:{key}"}, is_manual_warmup=False,
        already_compiled=False)
    assert skipped and compile_ahead.active()


def _calls(bodies, device):
    for body in bodies:
        body()


def test_the_dry_pass_skips_each_launch_and_every_specialisation_compiles_once_on_the_pool():
    norm, gemm = _Kernel("_norm_kernel"), _Kernel("_gemm_kernel")
    bodies = [lambda: (_launch(norm, "rows"), _launch(gemm, "tile64"), _launch(norm, "rows")),
              lambda: (_launch(norm, "rows"), _launch(gemm, "tile128"))]
    earlier = []  # a hook installed before (a CompileWatch): not asked in the dry pass, back after it
    hook = knobs.runtime.jit_cache_hook = lambda **kw: earlier.append(kw["fn"].name)
    try:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            ahead = compile_ahead.compile_ahead(bodies, torch.device("cpu"), pool, dry_run=_calls)
        assert knobs.runtime.jit_cache_hook is hook and earlier == []
    finally:
        knobs.runtime.jit_cache_hook = None
    assert not compile_ahead.active()
    assert [d for d, _ in norm.preloaded] == ["_norm_kernel:rows"]
    assert sorted(d for d, _ in gemm.preloaded) == ["_gemm_kernel:tile128", "_gemm_kernel:tile64"]
    main = threading.get_ident()
    assert all(thread != main for _, thread in norm.preloaded + gemm.preloaded)  # on the pool's threads
    assert (ahead.kernels, ahead.failed, ahead.error) == (3, 0, None)
    assert ahead.dry_s >= 0 and ahead.compile_s >= 0
    assert ahead.summary()["kernels"] == 3


def test_a_dry_pass_that_fails_still_compiles_what_it_found_and_says_why():
    found, broken = _Kernel("_found_kernel"), _Kernel("_broken_kernel", fails=True)

    def cannot_be_captured():
        raise RuntimeError("operation not permitted when stream is capturing")

    bodies = [lambda: (_launch(found, "a"), _launch(broken, "b")), cannot_be_captured,
              lambda: _launch(found, "never reached")]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = compile_ahead.compile_ahead(bodies, torch.device("cpu"), pool, dry_run=_calls)
    assert knobs.runtime.jit_cache_hook is None and not compile_ahead.active()
    assert [d for d, _ in found.preloaded] == ["_found_kernel:a"] and len(broken.preloaded) == 1
    # a compile that fails is counted, not raised: the warm-up that launches it raises it, with context
    assert (ahead.kernels, ahead.failed) == (2, 1)
    assert ahead.error == "RuntimeError: operation not permitted when stream is capturing"


def test_the_switch_turns_the_dry_pass_off():
    ran = []
    with options.override(compile_ahead=False), concurrent.futures.ThreadPoolExecutor(1) as pool:
        assert compile_ahead.compile_ahead([lambda: ran.append(1)], torch.device("cpu"), pool,
                                           dry_run=_calls) is None
    assert ran == []


def test_one_time_work_that_a_capture_cannot_hold_is_left_to_the_warm_ups():
    """The MoE router's counter (made once per device, zeroed outside any graph) and the tensor-core
    GEMV's probe (it syncs) are not made or run in the dry pass, and the route the probe guards is
    the one compiled."""
    from runtime.kernels import moe_triton, router_triton
    from runtime.kernels.moe_triton_details.tiles import Tiles

    device, tiles = torch.device("cpu"), Tiles(8, 64, 128, 4, 4)
    seen = {}

    def body():
        seen["counter"] = router_triton._done_counter(device)
        seen["verified"] = moe_triton.tensor_core_gemv_verified(device, tiles)

    counters, verified = dict(router_triton._DONE_COUNTERS), dict(moe_triton._TENSOR_CORE_VERIFIED)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        compile_ahead.compile_ahead([body], device, pool, dry_run=_calls)
    assert seen["verified"] is True and torch.equal(seen["counter"], torch.zeros(1, dtype=torch.int32))
    assert router_triton._DONE_COUNTERS == counters and moe_triton._TENSOR_CORE_VERIFIED == verified


def test_the_warm_ups_compile_ahead_on_a_gpu_alone_and_not_beside_collectives():
    from runtime import cuda_graphs, warm_up

    replica = types.SimpleNamespace(parallel=types.SimpleNamespace(replica=types.SimpleNamespace(size=2)))
    alone = types.SimpleNamespace(parallel=types.SimpleNamespace(replica=types.SimpleNamespace(size=1)))
    assert not cuda_graphs.compile_ahead_allowed(replica) and cuda_graphs.compile_ahead_allowed(alone)
    with options.override(compile_ahead=False):  # nor with the switch off: no dry steps are built
        assert not cuda_graphs.compile_ahead_allowed(alone)
    ran = []
    report = warm_up.run_side_by_side({2: lambda: ran.append(2)}, torch.device("cpu"), threads=1)
    assert ran == [2] and report.ahead is None and "ahead" not in report.summary()  # nothing compiles on CPU
    ahead = compile_ahead.Ahead(kernels=77, failed=0, dry_s=0.4, compile_s=6.0)
    summary = warm_up.Report(7.0, {8: 1.0}, ahead).summary()
    assert summary["ahead"] == {"kernels": 77, "failed": 0, "dry_s": 0.4, "compile_s": 6.0, "error": None}


@pytest.mark.gpu
def test_a_kernel_compiles_ahead_without_running_and_its_launch_then_compiles_nothing():
    import triton
    import triton.language as tl

    @triton.jit
    def _ahead_kernel(x_ptr, N: tl.constexpr):
        tl.store(x_ptr + tl.arange(0, N), tl.arange(0, N) * 1000003)  # out of any index range below

    width, table = 32, torch.arange(8, device="cuda")
    x = torch.full((width,), -1, dtype=torch.int64, device="cuda")

    def step():
        _ahead_kernel[(1,)](x, N=width)
        return table[x]  # run after the kernel, an index out of range: a device assert

    with CompileWatch() as watch, concurrent.futures.ThreadPoolExecutor(2) as pool:
        ahead = compile_ahead.compile_ahead([step], torch.device("cuda"), pool)
    torch.cuda.synchronize()
    assert (ahead.kernels, ahead.failed, ahead.error) == (1, 0, None)
    assert torch.equal(x.cpu(), torch.full((width,), -1))  # nothing ran
    assert [name for name, _ in watch.events] == ["_ahead_kernel"]  # compiled, timed on its thread
    with CompileWatch() as again:
        _ahead_kernel[(1,)](x, N=width)
    torch.cuda.synchronize()
    assert again.events == [] and torch.equal(x.cpu(), torch.arange(width) * 1000003)


def test_the_eager_steps_span_the_kernels_choices_and_each_is_a_valid_step():
    """runtime/eager_steps.py: its synthetic steps (a prompt of every power-of-two length, short chunks
    beside decodes over a long context, a full mixed step) within max_model_len, and each a step the
    forward takes (run here for real on a throwaway tiny model: on a GPU the dry pass runs none)."""
    from runtime import eager_steps
    from runtime.config import preset
    from runtime.model import GptOss

    assert eager_steps.step_shapes(8192, 131072) == (
        [(0, 1 << n, 0) for n in range(4, 14)]
        + [(8, q, 4096) for q in (1, 2, 4, 8)] + [(2048, 6144, 0)])
    assert eager_steps.step_shapes(96, 80) == [(0, 16, 0), (0, 32, 0), (0, 64, 0),
                                               (8, 1, 72), (8, 2, 72), (8, 4, 72), (8, 8, 72), (24, 72, 0)]
    model = GptOss(preset("tiny"), dtype=torch.float32).randomize()
    model.make_pool(num_pages=16, sliding_pages=16)
    shapes = eager_steps.step_shapes(96, 80)
    logits = [eager_steps.dry_step(model, *shape)() for shape in shapes]
    vocab = model.cfg.vocab_size
    assert [tuple(x.shape) for x in logits] == [(decodes + 1, vocab) for decodes, _, _ in shapes]
    with concurrent.futures.ThreadPoolExecutor(2) as pool:  # on CPU nothing compiles: nothing recorded
        ahead = compile_ahead.compile_ahead([eager_steps.dry_step(model, *shapes[0])], model.device, pool,
                                            dry_run=_calls)
    assert (ahead.kernels, ahead.error) == (0, None)


def test_compile_ahead_through_the_installed_triton_fills_the_cache_every_launch_reads(tmp_path):
    """scripts/compile_ahead_cpu.py: the synthetic eager steps through the real Triton (not its
    interpreter) for an sm_90 target on CPU. The dry pass records every specialisation through the
    installed Triton's compile hook, each compiles (Triton's ptxas) from its serialised form, and the
    same steps again launch every kernel from the cache, none missing it: what breaks here first when
    Triton changes the internals compile_ahead uses."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton")
    done = subprocess.run([sys.executable, "scripts/compile_ahead_cpu.py", "--max-batch-tokens", "32"],
                          cwd=repo, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["ahead"]["kernels"] >= 10 and result["ahead"]["failed"] == 0, result
    assert {"_moe_gemm_kernel", "_paged_attention_kernel"} <= set(result["kernels_launched"]), result
    assert result["missed_the_cache"] == [], result
