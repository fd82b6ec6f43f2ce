"""Where the runtime keeps files it makes itself (the embedded tiny checkpoint, the tokenizer vocab)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir(*parts: str) -> Path:
    """$GPT_OSS_CACHE, else $XDG_CACHE_HOME/gpt-oss-runtime, else ~/.cache/gpt-oss-runtime; created on use."""
    root = os.environ.get("GPT_OSS_CACHE")
    if root is None:
        base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(base, "gpt-oss-runtime")
    path = Path(root, *parts)
    path.mkdir(parents=True, exist_ok=True)
    return path
