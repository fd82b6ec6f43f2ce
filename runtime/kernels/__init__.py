"""The model's hot operations: each module holds the pure-torch reference the model runs on CPU
(and that every faster kernel is tested against); Triton kernels sit beside them and run on CUDA."""

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels on CUDA tensors, unless GPT_OSS_REFERENCE=1 forces the torch references.

    GPT_OSS_TRITON=1 runs them on CPU tensors too, through Triton's interpreter (TRITON_INTERPRET=1
    must be set before triton is imported): how the CPU tests check the model's kernel path."""
    if os.environ.get("GPT_OSS_REFERENCE", "0") == "1":
        return False
    return t.is_cuda or os.environ.get("GPT_OSS_TRITON", "0") == "1"
