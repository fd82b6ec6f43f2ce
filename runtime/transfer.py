"""Host data to the GPU without waiting for the GPU.

A plain `torch.tensor(values, device="cuda")` (or `.to("cuda")` of pageable memory) may wait for
the stream to drain before copying, which would stall the engine's host work behind the step in
flight. Staging through pinned memory makes the copy an ordinary asynchronous stream operation;
torch's caching host allocator keeps the pinned block until that copy has run.
"""

from __future__ import annotations

import torch


def to_device(values, dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """`values` (a list, or a CPU tensor) as a tensor on `device`, copied asynchronously on CUDA."""
    t = values.to(dtype) if isinstance(values, torch.Tensor) else torch.tensor(values, dtype=dtype)
    if torch.device(device).type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)
