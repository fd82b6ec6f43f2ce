"""Shared fixtures: the tiny model written once per session in both checkpoint layouts."""

import os

import pytest  # noqa: E402
import torch  # noqa: E402

# Without a GPU, Triton kernels run in its interpreter, which must be chosen before any @triton.jit
# decorator runs; with one, they compile for it.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from runtime.checkpoint import write_checkpoint  # noqa: E402
from runtime.config import preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """{"original": path, "hf": path}: the same random tiny weights (seed 0) in both layouts; the HF
    copy is split over several shard files with an index, as the real repository is."""
    root = tmp_path_factory.mktemp("checkpoints")
    cfg = preset("tiny")
    return {
        "original": str(write_checkpoint(cfg, root / "original", layout="original", seed=0)),
        "hf": str(write_checkpoint(cfg, root / "hf", layout="hf", seed=0, shard_bytes=40 << 20)),
    }


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
