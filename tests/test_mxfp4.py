"""runtime.mxfp4.decode against values worked out by hand from docs/gpt-oss-spec.md §3 (E2M1 codes, low
nibble first, E8M0 scale with bias 127)."""

import pytest
import torch

from runtime import mxfp4
from runtime.checkpoint import random_tensor, tensor_specs
from runtime.config import preset

DTYPES = [torch.float32, torch.bfloat16]


def block(byte_values, scale):
    """One 16-byte block whose first bytes are `byte_values` (the rest 0x00), with one scale byte."""
    data = list(byte_values) + [0] * (16 - len(byte_values))
    return torch.tensor([data], dtype=torch.uint8), torch.tensor([scale], dtype=torch.uint8)


@pytest.mark.parametrize("dtype", DTYPES)
def test_nibble_order_and_codes(dtype):
    # 0x21: low nibble 0x1 = +0.5 is element 0, high nibble 0x2 = +1.0 is element 1.
    # 0xF8: low 0x8 = -0.0, high 0xF = -6.0.   0x3C: low 0xC = -2.0, high 0x3 = +1.5.
    out = mxfp4.decode(*block([0x21, 0xF8, 0x3C], 127), dtype)
    assert out.dtype == dtype
    assert out.shape == (32,)
    assert out[:6].tolist() == [0.5, 1.0, -0.0, -6.0, -2.0, 1.5]
    assert torch.signbit(out[2]).item() and not torch.signbit(out[0]).item()  # code 8 is -0.0
    assert out[6:].tolist() == [0.0] * 26  # zero bytes decode to +0.0
    assert not torch.signbit(out[6:]).any()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("scale, expected", [
    (127, [0.5, 1.0]),         # 2**0
    (128, [1.0, 2.0]),         # 2**1
    (125, [0.125, 0.25]),      # 2**-2
    (137, [512.0, 1024.0]),    # 2**10
    (100, [2.0 ** -28, 2.0 ** -27]),  # 2**-27
])
def test_scale_is_a_power_of_two(dtype, scale, expected):
    out = mxfp4.decode(*block([0x21], scale), dtype)
    assert out[:2].tolist() == expected


def test_every_code():
    # Byte 0x10*hi + lo for (lo, hi) = (0,1), (2,3), ... lays out codes 0..15 as elements 0..15.
    packed = [lo | (lo + 1) << 4 for lo in range(0, 16, 2)]
    out = mxfp4.decode(*block(packed * 2, 127), torch.float32)
    table = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0]
    assert out.tolist() == table * 2
    assert list(mxfp4.FP4_VALUES) == table


def test_scales_apply_per_block_along_the_last_axis():
    # Two rows of two blocks each, all bytes 0x77 (= +6.0, +6.0); scales differ per (row, block).
    blocks = torch.full((2, 2, 16), 0x77, dtype=torch.uint8)
    scales = torch.tensor([[127, 126], [129, 120]], dtype=torch.uint8)
    out = mxfp4.decode(blocks, scales, torch.float32)
    assert out.shape == (2, 64)
    assert out[0, :32].eq(6.0).all() and out[0, 32:].eq(3.0).all()
    assert out[1, :32].eq(24.0).all() and out[1, 32:].eq(6.0 / 128).all()


def test_leading_dims_are_kept():
    blocks = torch.randint(0, 256, (3, 5, 4, 16), dtype=torch.uint8)
    scales = torch.randint(110, 140, (3, 5, 4), dtype=torch.uint8)
    out = mxfp4.decode(blocks, scales, torch.float32)
    assert out.shape == (3, 5, 128)
    # Element 2j + 1 of block g of row (1, 2) is the high nibble of byte j, times its scale.
    byte = blocks[1, 2, 3, 7].item()
    assert (out[1, 2, 3 * 32 + 15].item()
            == mxfp4.FP4_VALUES[byte >> 4] * 2.0 ** (scales[1, 2, 3].item() - 127))
    assert (out[1, 2, 3 * 32 + 14].item()
            == mxfp4.FP4_VALUES[byte & 15] * 2.0 ** (scales[1, 2, 3].item() - 127))


def test_bf16_and_fp32_decode_to_the_same_values():
    # Every MXFP4 value has at most 2 significant bits, so bf16 holds it exactly (normal exponents).
    blocks = torch.randint(0, 256, (7, 9, 16), dtype=torch.uint8)
    scales = torch.randint(90, 165, (7, 9), dtype=torch.uint8)
    f32 = mxfp4.decode(blocks, scales, torch.float32)
    bf16 = mxfp4.decode(blocks, scales, torch.bfloat16)
    assert bf16.dtype == torch.bfloat16
    assert torch.equal(bf16.float(), f32)
    assert torch.equal(torch.signbit(bf16), torch.signbit(f32))


@pytest.mark.parametrize("blocks_shape, scales_shape", [
    ((4, 16), (5,)),        # one scale too many
    ((2, 4, 16), (4, 2)),   # leading dims swapped
    ((4, 15), (4,)),        # a block is 16 bytes
    ((4, 32), (4,)),
    ((4, 16), (4, 1)),      # scales with an extra axis
])
def test_mismatched_shapes_raise(blocks_shape, scales_shape):
    with pytest.raises(ValueError):
        mxfp4.decode(torch.zeros(blocks_shape, dtype=torch.uint8),
                     torch.zeros(scales_shape, dtype=torch.uint8))


def test_non_uint8_inputs_raise():
    with pytest.raises(TypeError):
        mxfp4.decode(torch.zeros(4, 16, dtype=torch.int8), torch.zeros(4, dtype=torch.uint8))
    with pytest.raises(TypeError):
        mxfp4.decode(torch.zeros(4, 16, dtype=torch.uint8), torch.zeros(4, dtype=torch.int32))


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["gpt-oss-20b", "gpt-oss-120b"])
def test_mxfp4_decode_on_gpu_is_exact_at_real_shapes(name):
    spec = tensor_specs(preset(name))["block.0.mlp.mlp1_weight.blocks"]
    gen = torch.Generator(device="cuda").manual_seed(0)
    blocks = random_tensor(spec, gen, "cuda")[:2]
    scales = random_tensor(tensor_specs(preset(name))["block.0.mlp.mlp1_weight.scales"], gen, "cuda")[:2]
    gpu = mxfp4.decode(blocks, scales, torch.bfloat16)
    cpu = mxfp4.decode(blocks.cpu(), scales.cpu(), torch.float32)
    assert torch.equal(gpu.cpu().float(), cpu)


def test_kernel_order_puts_a_quads_bytes_together_and_decodes_alike():
    blocks = torch.randint(0, 256, (3, 5, 2, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (3, 5, 2), dtype=torch.uint8)
    kernel = mxfp4.quad_transpose(blocks)
    for q in range(4):  # lane q's bytes q, q + 4, q + 8, q + 12 become bytes 4q .. 4q + 3
        assert torch.equal(kernel[..., 4 * q:4 * q + 4], blocks[..., q::4])
    assert torch.equal(mxfp4.quad_transpose(kernel), blocks)
    assert torch.equal(mxfp4.decode(kernel, scales, torch.float32, kernel_order=True),
                       mxfp4.decode(blocks, scales, torch.float32))
