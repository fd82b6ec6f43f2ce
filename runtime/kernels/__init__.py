"""The model's hot operations: each module holds the pure-torch reference the model runs on CPU
(and that every faster kernel is tested against)."""
