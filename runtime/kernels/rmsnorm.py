"""RMSNorm without mean subtraction or bias: y = x * rsqrt(mean(x^2) + eps) * g."""

import torch


def rms_norm(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    # fp32 math from the activation dtype, one rounding back: what OpenAI's reference and HF do.
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * gain.float()
    return y.to(x.dtype)


def add_rms_norm(x: torch.Tensor, delta: torch.Tensor | None, gain: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(residual, normed): the residual add x + delta rounded to x's dtype (x itself when delta is
    None), and rms_norm of that rounded residual, which is what the next block reads."""
    residual = x if delta is None else (x + delta).to(x.dtype)
    return residual, rms_norm(residual, gain, eps)
