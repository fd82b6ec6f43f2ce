"""The model's hot operations: each module holds the pure-torch reference the model runs on CPU
(and that every faster kernel is tested against); Triton kernels sit beside them and run on CUDA."""

import torch

from runtime.options import options


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels on CUDA tensors, unless options.reference (GPT_OSS_REFERENCE=1) forces the torch
    references; options.kernels_on_cpu (GPT_OSS_TRITON=1) runs them on CPU tensors too, through Triton's
    interpreter: how the CPU tests check the model's kernel path."""
    if options.reference:
        return False
    return t.is_cuda or options.kernels_on_cpu
