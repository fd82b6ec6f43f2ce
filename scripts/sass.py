"""Machine code for Hopper without a GPU: a Triton kernel compiled for sm_90 (Triton's bundled ptxas),
disassembled (nvdisasm) and its instructions counted, for scripts/sass_attention.py and
scripts/sass_moe.py.

Register allocation and scheduling differ between Triton versions: run these with the device's Triton
(3.6: a virtual environment with `triton==3.6.0` and a CPU torch) for counts that match the GPU's code.
Counts are static (each loop body once), not timings.
"""

from __future__ import annotations

import collections
import dataclasses
import re
import subprocess
import tempfile
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget

# One SASS line: "/*0a30*/  @!P0 OPCODE.MODIFIERS operands ;" -> (address, opcode without modifiers,
# the whole text); labels (".L_x_12:") stand on lines of their own.
INSTRUCTION = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)([^;]*);")
LABEL = re.compile(r"^\s*(\.L_x_\d+):", re.M)


# What one Hopper SM holds (H100 and H200): 64K 32-bit registers, 228 KB of shared memory (1 KB of it
# reserved per CTA), 64 warps.
SM_REGISTERS, SM_SHARED_BYTES, SM_CTA_RESERVED_BYTES, SM_WARPS = 65536, 228 * 1024, 1024, 64


@dataclasses.dataclass(frozen=True)
class Build:
    """A kernel compiled for sm_90: its SASS and what a CTA takes of an SM."""
    sass: str
    registers: int  # per thread
    stack: int  # bytes per thread: registers spilled to local memory (and call frames)
    shared: int  # bytes per CTA
    num_warps: int

    @property
    def ctas_per_sm(self) -> int:
        """CTAs of this kernel one SM runs at once, by registers, shared memory and warps."""
        threads = 32 * self.num_warps
        return min(SM_REGISTERS // (self.registers * threads),
                   SM_SHARED_BYTES // (self.shared + SM_CTA_RESERVED_BYTES), SM_WARPS // self.num_warps)


def compile_sm90(kernel, signature: dict, constexprs: dict, aligned: list[int], **options):
    """`kernel` compiled for sm_90 (Triton's CompiledKernel; see build for the arguments)."""
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs,
                                       attrs={(i,): [["tt.divisibility", 16]] for i in aligned})
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options)


def build(kernel, signature: dict, constexprs: dict, aligned: list[int], **options) -> Build:
    """`kernel` compiled for sm_90: `signature` as triton.compile takes it, pointer and stride
    arguments at the indices `aligned` marked 16-divisible (as launches specialise them; without that
    the loads compile to narrow accesses), `options` num_warps, num_stages, maxnreg. Registers and
    stack from cuobjdump's resource usage (Triton fills them in only when it loads the kernel on a GPU)."""
    compiled = compile_sm90(kernel, signature, constexprs, aligned, **options)
    tools = Path(triton.__file__).parent / "backends/nvidia/bin"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        sass = subprocess.run([str(tools / "nvdisasm"), "-c", cubin.name], capture_output=True, text=True,
                              check=True).stdout
        usage = subprocess.run([str(tools / "cuobjdump"), "--dump-resource-usage", cubin.name],
                               capture_output=True, text=True, check=True).stdout
    registers, stack = (int(re.search(rf"{what}:(\d+)", usage).group(1)) for what in ("REG", "STACK"))
    return Build(sass, registers, stack, compiled.metadata.shared, compiled.metadata.num_warps)


def disassemble(kernel, signature: dict, constexprs: dict, aligned: list[int], **options) -> str:
    """The SASS of `kernel` for sm_90 (see build)."""
    return build(kernel, signature, constexprs, aligned, **options).sass


def count(sass: str) -> collections.Counter:
    """Instructions by opcode (modifiers dropped: HGMMA.64x128x16 counts as HGMMA)."""
    return collections.Counter(op for _, op, _ in INSTRUCTION.findall(sass))


def hottest_loop(sass: str, marker: str) -> str:
    """The body of the innermost loop holding `marker` (an opcode, e.g. HGMMA): from the label a
    backward branch jumps to, up to that branch, the shortest such span that contains the marker."""
    labels = {m.group(1): m.start() for m in LABEL.finditer(sass)}
    best = None
    for branch in re.finditer(r"BRA\s+`?\(?(\.L_x_\d+)\)?", sass):
        start = labels.get(branch.group(1))
        if start is None or start >= branch.start():
            continue  # a forward branch
        body = sass[start:branch.end()]
        if marker in body and (best is None or len(body) < len(best)):
            best = body
    if best is None:
        raise ValueError(f"no loop with {marker} in the kernel")
    return best
