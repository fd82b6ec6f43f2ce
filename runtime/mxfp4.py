"""MXFP4 (OCP microscaling FP4), as stored in GPT-OSS checkpoints.

A block is 32 E2M1 values packed two per byte (element 2j in the low nibble of byte j, 2j+1 in the
high nibble) plus one E8M0 scale byte: value = FP4(code) * 2**(scale - 127). Blocks run along the
last (input / reduction) axis. Expert weights stay packed in memory; this reference decode is what
every kernel is checked against.

Kernel order: the model keeps each block's 16 bytes transposed as a 4 x 4 matrix (`quad_transpose`,
done once when the weights load), the order every MoE kernel reads; `decode(..., kernel_order=True)`
decodes blocks kept so.
"""

from __future__ import annotations

import torch

BLOCK = 32  # values per scale
BYTES_PER_BLOCK = BLOCK // 2

# E2M1 code -> value; codes 8..15 are the negatives of 0..7 (code 8 is -0).
FP4_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
SCALE_BIAS = 127


def decode(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
           kernel_order: bool = False) -> torch.Tensor:
    """Packed [..., G, 16] uint8 blocks and [..., G] uint8 scales -> [..., G * 32] values in `dtype`;
    kernel_order: the blocks' bytes are in kernel order (`quad_transpose`), as the model keeps them.

    Exact for bfloat16 and float32: every value is a 2-bit-mantissa number times a power of two.
    A scale byte of 255 gives inf (as OpenAI's torch reference does).
    """
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise TypeError(f"MXFP4 blocks and scales must be uint8, got {blocks.dtype} and {scales.dtype}")
    if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not match scales {tuple(scales.shape)}")
    if kernel_order:
        blocks = quad_transpose(blocks)
    lut = torch.tensor(FP4_VALUES, dtype=torch.float32, device=blocks.device)
    low = lut[(blocks & 0x0F).long()]
    high = lut[(blocks >> 4).long()]
    values = torch.stack((low, high), dim=-1).flatten(-2)  # [..., G, 32], element 2j then 2j+1
    exponents = scales.to(torch.int32).unsqueeze(-1) - SCALE_BIAS
    return torch.ldexp(values, exponents.to(torch.float32)).flatten(-2).to(dtype)


def quad_transpose(blocks: torch.Tensor) -> torch.Tensor:
    """[..., G, 16] blocks with each block's bytes transposed as a 4 x 4 matrix: byte 4q + i of the
    result is byte q + 4i of the block (its own inverse: checkpoint order to kernel order and back).
    A tensor-core operand gives lane q of each quad the block's bytes q, q + 4, q + 8, q + 12: in
    this order they are one aligned word, which the GEMM reads with one ldmatrix instead of one load
    per byte; the GEMVs, which read whole blocks, only rename registers (ptx.kernel_order_element)."""
    if blocks.shape[-1] != BYTES_PER_BLOCK:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} do not end in {BYTES_PER_BLOCK} bytes")
    return blocks.unflatten(-1, (4, 4)).transpose(-1, -2).flatten(-2).contiguous()


def random_scales(shape: tuple[int, ...], std: float, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Scale bytes for random weights of spread `std` when the codes are uniform over all 16.

    Uniform codes have an RMS of about 2.93, so the exponent is centred on log2(std / 2.93), with
    +-1 of per-block jitter so that scales differ between blocks.
    """
    centre = SCALE_BIAS + round(torch.log2(torch.tensor(std / 2.93)).item())
    jitter = torch.randint(-1, 2, shape, generator=generator, device=device)
    return (centre + jitter).clamp(1, 254).to(torch.uint8)
