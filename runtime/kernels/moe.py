"""Mixture of experts (docs/gpt-oss-spec.md §4.6): clamped SwiGLU experts (the router is
runtime/kernels/router.py).

The experts' weights stay packed MXFP4; the reference decodes only the experts a batch touches,
one at a time, so memory stays at one expert's bf16 weights whatever the model size.
"""

from __future__ import annotations

import torch

from runtime import mxfp4

SWIGLU_ALPHA = 1.702  # the quick-GELU constant, hard-coded in every GPT-OSS implementation


def swiglu(h: torch.Tensor, limit: float) -> torch.Tensor:
    """Gate = even channels (clamped above only), linear = odd channels (clamped both sides), +1 on linear."""
    gate = h[..., 0::2].clamp(max=limit)
    linear = h[..., 1::2].clamp(min=-limit, max=limit)
    return gate * torch.sigmoid(SWIGLU_ALPHA * gate) * (linear + 1)


def expert_rows(x: torch.Tensor, experts: torch.Tensor, mlp1_blocks: torch.Tensor, mlp1_scales: torch.Tensor,
                mlp1_bias: torch.Tensor, mlp2_blocks: torch.Tensor, mlp2_scales: torch.Tensor,
                mlp2_bias: torch.Tensor, limit: float, reduce=None) -> torch.Tensor:
    """Row i through expert experts[i]: x [m, d] -> [m, d_out] in fp32 (unweighted, bias included).

    `experts` index the packed tensors' first dimension (this rank's experts); blocks in kernel order
    (mxfp4.quad_transpose), as the model keeps them. When each expert's intermediate dimension is
    split over ranks, `reduce` sums the partial mlp2 outputs across them before the bias is added, so
    the bias counts once. A row whose expert is one past the last (E: an empty slot of expert
    parallelism's fixed-capacity exchange) is not computed; its output row is unspecified.
    """
    out = torch.zeros(x.shape[0], mlp2_bias.shape[-1], dtype=torch.float32, device=x.device)
    num_experts = mlp1_blocks.shape[0]
    for e in torch.unique(experts).tolist():
        if e == num_experts:
            continue
        rows = torch.nonzero(experts == e).squeeze(1)
        w1 = mxfp4.decode(mlp1_blocks[e], mlp1_scales[e], x.dtype, kernel_order=True)
        h = torch.nn.functional.linear(x[rows], w1, mlp1_bias[e])
        w2 = mxfp4.decode(mlp2_blocks[e], mlp2_scales[e], x.dtype, kernel_order=True)
        out[rows] = torch.nn.functional.linear(swiglu(h, limit), w2).float()
    if reduce is not None:
        out = reduce(out)
    return out + mlp2_bias[experts.clamp(max=num_experts - 1)].float()
