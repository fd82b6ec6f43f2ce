"""The model's hot operations: each module holds the pure-torch reference the model runs on CPU
(and that every faster kernel is tested against); Triton kernels sit beside them and run on CUDA."""

import os

import torch


def use_triton(t: torch.Tensor) -> bool:
    """Triton kernels on CUDA tensors, unless GPT_OSS_REFERENCE=1 forces the torch references."""
    return t.is_cuda and os.environ.get("GPT_OSS_REFERENCE", "0") != "1"
