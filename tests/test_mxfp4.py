"""MXFP4 decode against values computed by hand (spec §3)."""

import pytest
import torch

from runtime import mxfp4


def one_block(first_bytes, scale):
    blocks = torch.zeros(1, 16, dtype=torch.uint8)
    blocks[0, : len(first_bytes)] = torch.tensor(first_bytes, dtype=torch.uint8)
    return blocks, torch.tensor([scale], dtype=torch.uint8)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hand_computed_values(dtype):
    # 0x21: low nibble 1 (+0.5) is element 0, high nibble 2 (+1.0) element 1.
    # 0xF8: low nibble 8 (-0.0), high nibble 15 (-6.0). 0x7B: 11 (-1.5), 7 (+6.0). Scale 127 = x1.
    out = mxfp4.decode(*one_block([0x21, 0xF8, 0x7B], 127), dtype)
    assert out.dtype == dtype and out.shape == (32,)
    assert out[:6].tolist() == [0.5, 1.0, -0.0, -6.0, -1.5, 6.0]
    assert out[6:].abs().sum() == 0
    assert torch.signbit(out[2])  # -0.0 keeps its sign
    assert mxfp4.decode(*one_block([0x21], 128), dtype)[:2].tolist() == [1.0, 2.0]  # x2
    assert mxfp4.decode(*one_block([0x65], 125), dtype)[:2].tolist() == [0.75, 1.0]  # (3.0, 4.0) x 1/4
    assert mxfp4.decode(*one_block([0x21], 117), dtype)[:2].tolist() == [0.5 / 1024, 1.0 / 1024]


def test_all_codes_and_block_order():
    codes = torch.arange(16, dtype=torch.uint8)
    blocks = (codes[0::2] | (codes[1::2] << 4)).repeat(2).view(1, 16)  # elements 0..15, twice
    values = mxfp4.decode(blocks, torch.tensor([127], dtype=torch.uint8), torch.float32)
    expected = [0, 0.5, 1, 1.5, 2, 3, 4, 6, -0.0, -0.5, -1, -1.5, -2, -3, -4, -6]
    assert values.tolist() == expected * 2
    # Two blocks of one row, different scales: the scale applies per 32 values along the last axis.
    two = mxfp4.decode(torch.full((1, 2, 16), 0x22, dtype=torch.uint8), torch.tensor([[127, 129]], dtype=torch.uint8))
    assert two.shape == (1, 64) and two[0, :32].unique().tolist() == [1.0] and two[0, 32:].unique().tolist() == [4.0]


def test_bf16_and_fp32_agree_exactly_on_random_blocks():
    blocks = torch.randint(0, 256, (8, 6, 16), dtype=torch.uint8)
    scales = torch.randint(100, 150, (8, 6), dtype=torch.uint8)
    assert torch.equal(mxfp4.decode(blocks, scales, torch.bfloat16).float(), mxfp4.decode(blocks, scales, torch.float32))


def test_bad_shapes_and_dtypes_raise():
    with pytest.raises(ValueError):
        mxfp4.decode(torch.zeros(2, 16, dtype=torch.uint8), torch.zeros(3, dtype=torch.uint8))
    with pytest.raises(TypeError):
        mxfp4.decode(torch.zeros(2, 16), torch.zeros(2, dtype=torch.uint8))
