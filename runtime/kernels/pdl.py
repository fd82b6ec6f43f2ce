"""Programmatic dependent launch (PDL, Hopper and later) for the Triton kernels.

A decode step is ~12 kernels a layer, most of them a few microseconds long, so the gap between one
kernel's end and the next one's start (launch, then the first loads' latency) is a large share of a
batch-1 step. Launched with PDL, a kernel may start while the one before it is still finishing:
its programs do what needs no earlier result (index math, loading weights) and then wait, in
`wait_for_previous_kernel`, until the kernel before has finished and its writes are visible.

The rule every kernel launched with `launch_args` keeps, which makes this safe:
- before `wait_for_previous_kernel` it reads only weights (never written during a step) and
  writes nothing (the kernel before may still be reading what it would overwrite);
- it calls `wait_for_previous_kernel` exactly where its first other read or its first write is.
The wait covers everything earlier too: the kernel before finished only after its own wait, so
every kernel before it had finished. Kernels launched without PDL (cuBLAS, torch's own) are
ordered as usual; a PDL kernel after one of them starts early and waits for it the same way.

Off under Triton's interpreter, on GPUs before Hopper, on a Triton without the `launch_pdl`
launch option, and when GPT_OSS_PDL=0 (the bench's A/B switch). CUDA graphs capture the launches as
programmatic edges, so graph replays keep the overlap.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from runtime.options import options

INTERPRET = options.interpret  # fixed for the process: Triton reads it when a kernel is defined


try:  # Triton's own grid-dependency intrinsics (known to the compiler as memory barriers)
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton: the same PTX instructions as side-effecting inline asm
    @triton.jit
    def gdc_wait():
        tl.inline_asm_elementwise("griddepcontrol.wait; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)

    @triton.jit
    def gdc_launch_dependents():
        tl.inline_asm_elementwise("griddepcontrol.launch_dependents; // $0", "=r", [], dtype=tl.int32,
                                  is_pure=False, pack=1)


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """Wait until the kernel launched before this one has finished (a no-op without PDL), then let
    the kernel after this one start launching its programs."""
    if PDL:
        gdc_wait()
        gdc_launch_dependents()


def _triton_has_launch_pdl() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
    except ImportError:
        return False
    return "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {})


@functools.cache
def _supported(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9 and _triton_has_launch_pdl()


def enabled(device: torch.device) -> bool:
    """Whether kernels on `device` launch with PDL (read at each launch: GPT_OSS_PDL can change)."""
    if INTERPRET or device.type != "cuda" or not options.pdl:
        return False
    return _supported(device.index if device.index is not None else torch.cuda.current_device())


def launch_args(device: torch.device) -> dict:
    """Keyword arguments for a kernel launch: the kernel's PDL constexpr, and Triton's launch option."""
    return {"PDL": True, "launch_pdl": True} if enabled(device) else {"PDL": False}
