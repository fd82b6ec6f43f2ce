"""RMSNorm without mean subtraction or bias: y = x * rsqrt(mean(x^2) + eps) * g."""

import torch


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 math from the activation dtype, one rounding back: what OpenAI's reference and HF do.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * gain.float()
    return y.to(x.dtype)
