"""The MoE kernels' inline PTX, as strings built in Python (the CPU tests emulate them instruction by
instruction, tests/test_moe.py).

Three decodes of MXFP4 (E2M1 nibbles, one E8M0 scale byte per 32-value block), each a handful of
byte-parallel logic ops per 4 or 8 values instead of a table lookup per value:
- `decode_ptx`: the wgmma GEMM's, 8 values to bf16 with their scales applied, elementwise;
- `decode32_ptx`: the CUDA-core GEMV's, a whole block to fp32 without its scale (applied once, to the
  block's partial sum);
- `tensor_core_step_ptx`: the tensor-core GEMVs' decode to bf16 fused with their mma.sync steps;
  `tensor_core_row_result_ptx` / `tensor_core_rows_result_ptx` pick the results out of the
  accumulators (see gemv_tensor_core.py for the lane layout they rely on).
"""

from __future__ import annotations


def decode_ptx(fold: bool) -> str:
    """PTX turning 4 packed bytes b0..b3 ($4) and their 4 scale bytes s0..s3 ($5) into 8 bf16 values,
    elementwise: $0, $1 hold the low nibbles' values of (b0, b1) and (b2, b3), $2, $3 the high
    nibbles'; each value is scaled by its own byte's scale, so the compiler may hand the asm any 4
    elements (the dot's operand layout groups bytes from two rows).

    A byte permute puts bytes j, j + 1 into the two 16-bit halves; then shifts and masks drop a
    nibble's exponent/mantissa bits into bits 6-8 and its sign into bit 15 of each half, which is the
    value times 2^-126; two packed bf16 multiplies apply 2^126 and 2^(s-127) (bf16 bits s << 7),
    folded into one when every scale byte is <= 128."""
    lines = ["{", ".reg .b32 s01, s23, a, b, v, big;", "mov.b32 big, 0x7E807E80;"]  # 2^126 in both halves
    pairs = {"s01": "0x4140", "s23": "0x4342"}  # prmt selectors: bytes (0, 1) or (2, 3) into the halves' lows
    for reg, selector in pairs.items():
        lines.append(f"prmt.b32 {reg}, $5, 0, {selector};")
        if fold:  # 2^126 * 2^(s-127) = 2^(s-1): bf16 exponent field s + 126 (needs s <= 128)
            lines.append(f"add.u32 {reg}, {reg}, 0x007E007E;")
        lines.append(f"shl.b32 {reg}, {reg}, 7;")
    # (output, bytes, payload shift, sign shift): low nibble bits 0-2 -> 6-8, 3 -> 15; high 4-6, 7 likewise
    for out, scale, payload, sign in ((0, "s01", 6, 12), (1, "s23", 6, 12), (2, "s01", 2, 8),
                                      (3, "s23", 2, 8)):
        lines += [f"prmt.b32 v, $4, 0, {pairs[scale]};", f"shl.b32 a, v, {payload};",
                  "and.b32 a, a, 0x01C001C0;", f"shl.b32 b, v, {sign};", "and.b32 b, b, 0x80008000;",
                  "or.b32 a, a, b;"]
        if not fold:
            lines.append("mul.rn.bf16x2 a, a, big;")
        lines.append(f"mul.rn.bf16x2 ${out}, a, {scale};")
    return "\n".join(lines + ["}"])


def kernel_order_element(word: int, nibble: int) -> int:
    """The block element that nibble `nibble` (0-7, even ones low in their byte) of word `word` (0-3)
    holds in kernel order: the word's byte b is the block's byte word + 4b (mxfp4.quad_transpose), and
    byte j holds elements 2j (low nibble) and 2j + 1."""
    return 2 * (word + 4 * (nibble // 2)) + nibble % 2


def decode32_ptx(e4m3: bool) -> str:
    """PTX turning one 32-value block's 16 packed bytes ($32..$35: four words in kernel order, byte b
    of word w being the block's byte w + 4b, see mxfp4.quad_transpose) into 32 fp32 registers, $e =
    element e of the block times 2^-14 (fp16 route) or 2^-6 (e4m3 route), exactly. Nibble n of word w
    is element `kernel_order_element(w, n)`; the outputs are named so that the order costs nothing.
    No scale here: the kernel applies the block's scale once, to the block's partial sum.

    Both routes first rebuild each nibble as a byte in all 4 byte lanes of a word at once: the low
    nibbles (sign from bit 3, exponent/mantissa bits from 0-2) and the high ones (sign already at 7,
    exponent/mantissa bits from 4-6) with 3-4 logic ops per 4 values. fp16 route: the byte is the top
    byte of an fp16 (sign 7, exponent/mantissa bits 1-3: the value times 2^-14, subnormal for the code
    0.5); a byte permute or mask then moves two of them into the two halves of an fp16x2 with zero low
    bytes (11 logic ops per word). e4m3 route: the byte is an e4m3 (exponent/mantissa bits 2-4: the
    value times 2^-6) that the hardware widens two at a time to fp16x2 (7 logic ops + 4 F2FP per word).
    Then each fp16 becomes an fp32 exactly (cvt.f32.f16: HADD2.F32, on the FMA pipe)."""
    lines = ["{", ".reg .b32 a, b, lo, hi, p<4>;", ".reg .b16 l, h, q<8>;"]
    shift = 2 if e4m3 else 1  # where exponent/mantissa bits go in the byte
    mask = "0x1C1C1C1C" if e4m3 else "0x0E0E0E0E"
    for w in range(4):
        word = f"${32 + w}"
        lines += [f"shl.b32 a, {word}, {shift};", f"and.b32 a, a, {mask};", f"shl.b32 b, {word}, 4;",
                  "and.b32 b, b, 0x80808080;", "or.b32 lo, a, b;",  # low nibbles: elements 0, 2, 4, 6
                  f"shr.u32 a, {word}, {4 - shift};", f"and.b32 a, a, {mask};",
                  f"and.b32 b, {word}, 0x80808080;",
                  "or.b32 hi, a, b;"]  # high nibbles: elements 1, 3, 5, 7
        if e4m3:
            lines += ["mov.b32 {l, h}, lo;", "cvt.rn.f16x2.e4m3x2 p0, l;", "cvt.rn.f16x2.e4m3x2 p1, h;",
                      "mov.b32 {l, h}, hi;", "cvt.rn.f16x2.e4m3x2 p2, l;", "cvt.rn.f16x2.e4m3x2 p3, h;",
                      "mov.b32 {q0, q2}, p0;", "mov.b32 {q4, q6}, p1;",
                      "mov.b32 {q1, q3}, p2;", "mov.b32 {q5, q7}, p3;"]
        else:  # bytes 0 and 2 to the top of the halves, then bytes 1 and 3 (zero bytes below)
            lines += ["prmt.b32 p0, lo, 0, 0x2404;", "and.b32 p1, lo, 0xFF00FF00;",
                      "prmt.b32 p2, hi, 0, 0x2404;", "and.b32 p3, hi, 0xFF00FF00;",
                      "mov.b32 {q0, q4}, p0;", "mov.b32 {q2, q6}, p1;",
                      "mov.b32 {q1, q5}, p2;", "mov.b32 {q3, q7}, p3;"]
        lines += [f"cvt.f32.f16 ${kernel_order_element(w, n)}, q{n};" for n in range(8)]
    return "\n".join(lines + ["}"])


# The tensor-core GEMVs' block scale multiplies the decoded weights (bf16: exact, its exponent range is
# fp32's), times 2^-TENSOR_CORE_SCALE_OFFSET so that scale bytes up to 192 fit; the kernel multiplies
# the result back at the end. Exact for scale bytes 66..192 (`tensor_core_gemv_fits`); other tensors
# keep the CUDA-core route.
TENSOR_CORE_SCALE_OFFSET = 64


def _pair_ptx(word: str, scale: str, out: str, i: int) -> list[str]:
    """bf16x2 `out` = (nibble i, nibble i + 4) of `word` times 2^(scale - 127 - TENSOR_CORE_SCALE_OFFSET): the
    sign/exponent/mantissa bits dropped into a bf16's (the value times 2^-126, `decode_ptx`'s trick),
    then one packed multiply by `scale`, a bf16x2 of 2^(s - 1 - TENSOR_CORE_SCALE_OFFSET)."""
    payload, sign = 6 - 4 * i, 12 - 4 * i  # nibble i's bits 4i..4i+2 to 6..8, bit 4i + 3 to 15
    return [f"shl.b32 a, {word}, {payload};" if payload >= 0 else f"shr.u32 a, {word}, {-payload};",
            "and.b32 a, a, 0x01C001C0;",
            f"shl.b32 b, {word}, {sign};" if sign else f"mov.b32 b, {word};",
            "and.b32 b, b, 0x80008000;", "or.b32 a, a, b;", f"mul.rn.bf16x2 {out}, a, {scale};"]


def tensor_core_step_ptx(token_groups: int = 1) -> str:
    """One thread's 32-value block of an even and an odd weight row against x: 8 MMAs per group of 8
    tokens, accumulating into two sets of 4 fp32 registers per group (words 0-1 and words 2-3: two
    independent chains).

    Operands (pack 4, one block's 4 words per input), with G = token_groups and I = 8G the first
    input: the outputs $0..$(8G - 1), group j's chains at 8j..8j + 3 and 8j + 4..8j + 7; $I..$I+3
    the even row's words (kernel order: `kernel_order_element`), $I+4..$I+7 the odd row's; $I+8
    the address of the even row's scale byte, $I+12 the odd row's; $I+16+4j the address of group
    j's 32 bf16 x values of the block (16-byte aligned; word q holds values 2q, 2q + 1); then the
    accumulators coming in, in the outputs' order.
    Scales and x are loaded here, not by Triton, so that the only tensors the compiler lays out are
    the weights (gemv_tensor_core.py: the lanes must follow the weight rows). The decoded weights of a block
    are reused by every group's MMAs."""
    first = 8 * token_groups
    words_a, words_b, scale_a, scale_b = first, first + 4, first + 8, first + 12
    x_addr = [first + 16 + 4 * j for j in range(token_groups)]
    acc_in = first + 16 + 4 * token_groups
    lines = ["{", f".reg .b32 a, b, sa, sb, ra<4>, rb<4>, bx<{4 * token_groups}>, x<{16 * token_groups}>;",
             f"ld.global.u8 sa, [${scale_a}];", f"ld.global.u8 sb, [${scale_b}];"]
    for j, addr in enumerate(x_addr):
        lines += [f"ld.global.v4.b32 {{x{16 * j + 4 * v}, x{16 * j + 4 * v + 1}, x{16 * j + 4 * v + 2}, "
                  f"x{16 * j + 4 * v + 3}}}, [${addr} + {16 * v}];" for v in range(4)]
    for reg in ("sa", "sb"):  # bf16x2 2^(s - 1 - offset): exponent field s + 126 - offset
        lines += [f"add.u32 {reg}, {reg}, {126 - TENSOR_CORE_SCALE_OFFSET};", f"shl.b32 a, {reg}, 23;",
                  f"shl.b32 {reg}, {reg}, 7;", f"or.b32 {reg}, {reg}, a;"]
    lines += [f"mov.b32 ${n}, ${acc_in + n};" for n in range(first)]
    for w in range(4):
        for i in range(4):
            lines += _pair_ptx(f"${words_a + w}", "sa", f"ra{i}", i)
            lines += _pair_ptx(f"${words_b + w}", "sb", f"rb{i}", i)
            # the pair's weights are elements e and e + 16 (kernel_order_element of nibbles i and i + 4):
            # x values e (low half) and e + 16 (high half) are halves i % 2 of x words e // 2 and e // 2 + 8
            e = kernel_order_element(w, i)
            for j in range(token_groups):
                x = 16 * j
                lines.append(f"prmt.b32 bx{4 * j + i}, x{x + e // 2}, x{x + e // 2 + 8}, "
                             f"{'0x5410' if i % 2 == 0 else '0x7632'};")
        for j in range(token_groups):
            base = 8 * j + (0 if w < 2 else 4)
            acc = ", ".join(f"${base + n}" for n in range(4))
            for i0, i1 in ((0, 1), (2, 3)):
                lines.append(f"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {{{acc}}}, "
                             f"{{ra{i0}, rb{i0}, ra{i1}, rb{i1}}}, {{bx{4 * j + i0}, bx{4 * j + i1}}}, "
                             f"{{{acc}}};")
    return "\n".join(lines + ["}"])


def tensor_core_step_constraints(token_groups: int) -> str:
    outputs, words, addresses = ["=f"] * 8 * token_groups, ["r"] * 8, ["l"] * (8 + 4 * token_groups)
    return ",".join(outputs + words + addresses + ["f"] * 8 * token_groups)


def tensor_core_row_result_ptx() -> str:
    """The two accumulator sets ($8-$11, $12-$15; pack 4) -> the even row's dot product in $0 and the
    odd row's in $4 where this lane holds the diagonal (lane 4g + t with t == g // 2: D[g, g] is
    element g % 2, D[g+8, g] element g % 2 + 2), zero in every other output."""
    lines = ["{", ".reg .b32 lane, g, t, h;", ".reg .pred holder, odd;", ".reg .f32 e<4>, ra, rb;",
             "mov.u32 lane, %laneid;", "shr.u32 g, lane, 2;", "and.b32 t, lane, 3;", "shr.u32 h, g, 1;",
             "setp.eq.u32 holder, t, h;", "and.b32 h, g, 1;", "setp.eq.u32 odd, h, 1;"]
    lines += [f"add.f32 e{n}, ${8 + n}, ${12 + n};" for n in range(4)]  # the two chains
    lines += ["selp.f32 ra, e1, e0, odd;", "selp.f32 rb, e3, e2, odd;",
              "selp.f32 $0, ra, 0f00000000, holder;", "selp.f32 $4, rb, 0f00000000, holder;"]
    lines += [f"mov.f32 ${n}, 0f00000000;" for n in (1, 2, 3, 5, 6, 7)]
    return "\n".join(lines + ["}"])


def tensor_core_rows_result_ptx() -> str:
    """A multi-token tile's two accumulator chains ($8-$11, $12-$15; pack 4: D[g, 2t], D[g, 2t + 1],
    D[g + 8, 2t], D[g + 8, 2t + 1] of lane 4g + t) -> the even row's sums for tokens 2t and 2t + 1
    in $0, $1 (repeated in $2, $3) and the odd row's in $4, $5 (repeated in $6, $7): each output
    element then holds one (feature, token) value, and the gate and linear halves of a token sit at
    the same element of two tensors."""
    lines = ["{", ".reg .f32 e<4>;"] + [f"add.f32 e{n}, ${8 + n}, ${12 + n};" for n in range(4)]
    lines += [f"mov.f32 ${n}, e{n % 2};" for n in range(4)]
    lines += [f"mov.f32 ${4 + n}, e{2 + n % 2};" for n in range(4)]
    return "\n".join(lines + ["}"])
