"""What the elementwise kernels' tests share: the device they run on and random inputs for it.

Without a GPU the tests run on CPU tensors through Triton's interpreter (fp32: its bf16 math is
wrong, docs/environment.md); with one, on CUDA tensors.
"""

import torch

from runtime.config import preset
from runtime.kernels.rope import yarn_frequencies

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BF16_U = 2.0**-8  # bf16 unit roundoff: rounding to nearest moves a value by at most this fraction of it


def randn(*shape, gen, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, generator=gen, device=DEVICE) * scale).to(dtype)


def gpt_oss_yarn(head_dim):
    """gpt-oss's YaRN inverse frequencies (on the tests' device) and concentration at head_dim."""
    cfg = preset("gpt-oss-20b")
    inv_freq, c = yarn_frequencies(head_dim, cfg.rope_theta, cfg.rope_scaling_factor,
                                   cfg.initial_context_length, cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
    return inv_freq.to(DEVICE), c
