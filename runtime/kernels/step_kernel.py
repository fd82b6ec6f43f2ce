"""`step_kernel(*counts)`: `triton.jit` for a kernel whose named integer arguments change step to step.

Triton compiles a kernel once per specialisation, and by default it specialises every integer
argument on whether it is 1 (then a constant) or a multiple of 16. A count that follows the step
(its tokens, sequences, split slices) then costs up to three compiles of one kernel: the CUDA graphs'
warm-ups meet some of them (batch 1, the multiples of 16, the sizes between), and an eager step whose
count falls in a class the start-up never met compiles in the middle of the run. Counts here bound
masks, loops and a binary search, or index a few split partials a program; none sets the alignment
of a wide load. So they are left unspecialised: one compile serves every step (compiled for sm_90,
RMSNorm's code is the same whatever its row count; the attention's differs by one division a program
where the split count is no longer the constant 1). Sizes fixed by the model and strides keep
Triton's specialisation (they decide vector widths). docs/performance.md, session 24, has what a
machine's first run paid for its compiles.
"""

from __future__ import annotations

import triton


def step_kernel(*counts: str):
    """Decorator: `triton.jit`, with `counts` (argument names) never specialised."""
    return triton.jit(do_not_specialize=list(counts))
