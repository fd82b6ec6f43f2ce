"""Compiling ahead through a real Triton, without a GPU: compile_ahead's record, serialise, preload and
cache-hit cycle checked on CPU against whatever Triton is installed.

    python scripts/compile_ahead_cpu.py [--model gpt-oss-20b] [--layers 2] [--max-batch-tokens 64]

with TRITON_INTERPRET unset.

runtime/kernels/compile_ahead.py leans on Triton internals (`knobs.runtime.jit_cache_hook`'s
arguments, the serialised specialisation, `JITFunction.preload`, the key a launch computes). This
runs the engine's synthetic eager steps (runtime/eager_steps.py) on CPU tensors through the Triton
kernels compiled for real (not interpreted) for an sm_90 target that a stand-in driver names: the
dry pass records every specialisation and skips its launch, the recorded ones compile for sm_90 on
threads (Triton's bundled ptxas), and the same steps run again must find every kernel in the cache
(a launch, here caught before it reaches a device, and no compile). Prints one JSON line; exits 1
where a kernel failed to compile or a launch missed the cache.

What it does not show: the dry pass's CUDA graph capture, and the routes a GPU's properties choose
(on CPU programmatic dependent launch is off, so the specialisations differ from an H100's). On CPU
the skipped kernels' outputs are read by the torch ops between them (on a GPU the capture keeps those
from running), so `torch.empty` gives zeros here: indices read from them stay in range.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402


class Sm90WithoutDevice:
    """The driver calls a launch makes before it compiles: an sm_90 target, device 0, stream 0."""

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


def stop_launches(launched: list[str]) -> None:
    """A cached kernel's launch is recorded instead of reaching a device."""
    from triton.compiler.compiler import CompiledKernel

    class Launcher:
        def __get__(self, kernel, owner=None):
            return lambda *args, **kwargs: launched.append(kernel.name)

    CompiledKernel.launch_metadata = lambda self, *args, **kwargs: None
    CompiledKernel.run = Launcher()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="gpt-oss-20b")
    p.add_argument("--layers", type=int, default=2, help="a sliding and a full layer")
    p.add_argument("--max-batch-tokens", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()

    from runtime.options import options

    if options.interpret:
        p.error("run with TRITON_INTERPRET unset: this checks the real compiler, not the interpreter")
    driver.set_active(Sm90WithoutDevice())
    torch.empty = torch.zeros  # see the module's docstring
    from runtime import eager_steps
    from runtime.config import preset
    from runtime.kernels import compile_ahead
    from runtime.kernels.compile_watch import knobs
    from runtime.model import GptOss

    if knobs is None:
        print(json.dumps({"error": "this Triton has no compile hooks"}))
        return 1
    options.kernels_on_cpu = True
    cfg = dataclasses.replace(preset(args.model), num_hidden_layers=args.layers)
    model = GptOss(cfg, dtype=torch.bfloat16, device="cpu")
    model.make_pool(64, 64)
    shapes = eager_steps.step_shapes(args.max_batch_tokens, cfg.max_position_embeddings)
    bodies = [eager_steps.dry_step(model, *shape) for shape in shapes]

    def run_bodies(bodies, device):  # the capture's place: on CPU the bodies run, their launches skipped
        for body in bodies:
            body()

    began = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(args.threads) as pool:
        ahead = compile_ahead.compile_ahead(bodies, torch.device("cpu"), pool, dry_run=run_bodies)
    seconds = time.perf_counter() - began

    launched, missed = [], []

    def miss(*, fn, **_):
        missed.append(fn.name)
        return True

    stop_launches(launched)
    knobs.runtime.jit_cache_hook = miss
    for body in bodies:
        body()
    import triton

    result = {"triton": triton.__version__, "steps": len(shapes), "ahead": ahead.summary() if ahead else None,
              "seconds": round(seconds, 2), "launches_from_the_cache": len(launched),
              "kernels_launched": sorted(set(launched)), "missed_the_cache": sorted(set(missed))}
    print(json.dumps(result))
    ok = ahead is not None and ahead.error is None and ahead.failed == 0 and ahead.kernels > 0 \
        and launched and not missed
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
