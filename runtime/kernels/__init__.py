"""The model's hot operations: each `<op>.py` holds the pure-torch reference, each `<op>_triton.py`
the Triton kernel tested against it; runtime/ops.py chooses which one runs."""

import os

# The kernels' speed and their tested tolerances assume that the compiler contracts a * b + c into one
# FMA, Triton's default up to 3.9; Triton 3.10 turns it off unless this says otherwise (3.9 warns).
# A user's own setting stands.
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
