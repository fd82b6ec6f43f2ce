"""The model's hot operations: each `<op>.py` holds the pure-torch reference, each `<op>_triton.py`
the Triton kernel tested against it; runtime/ops.py chooses which one runs."""
