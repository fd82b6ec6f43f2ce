"""`step_kernel(*counts)`: `triton.jit` for a kernel whose named integer arguments change step to step.

Triton compiles a kernel once per specialisation, and by default it specialises every integer
argument on whether it is 1 (then a constant) or a multiple of 16. A count that follows the step
(its tokens, sequences, split slices) then costs up to three compiles of one kernel: the CUDA graphs'
warm-ups meet some of them (batch 1, the multiples of 16, the sizes between), and an eager step whose
count falls in a class the start-up never met compiles in the middle of the run. Counts here only
bound masks, loops and a binary search, never an address whose alignment the compiler could use, so
they are left unspecialised: one compile serves every step. Sizes fixed by the model and strides keep
Triton's specialisation (they decide vector widths). docs/performance.md ("Compiles inside the timed
run", session 24) has what the first run on a machine paid.
"""

from __future__ import annotations

import triton


def step_kernel(*counts: str):
    """Decorator: `triton.jit`, with `counts` (argument names) never specialised."""
    return triton.jit(do_not_specialize=list(counts))
