"""Session fixtures shared by the test files, and the `gpu` marker's skip on machines without CUDA."""

import dataclasses
import os

import torch

# Triton reads TRITON_INTERPRET when a @triton.jit decorator runs, so it must be set before any test
# module imports a kernel. Only without a GPU: on a CUDA machine the kernels must really compile.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from runtime.checkpoint import write_checkpoint  # noqa: E402
from runtime.config import preset  # noqa: E402


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """The tiny preset's seed-0 weights written once in both layouts: {"original": path, "hf": path}.

    The HF copy uses 40 MiB shards, so (like openai/gpt-oss-20b) it is several files plus an index.
    """
    root = tmp_path_factory.mktemp("tiny")
    cfg = preset("tiny")
    original = write_checkpoint(cfg, root / "original", layout="original", seed=0)
    hf = write_checkpoint(cfg, root / "hf", layout="hf", seed=0, shard_bytes=40 << 20)
    return {"original": str(original), "hf": str(hf)}


@pytest.fixture(scope="session")
def two_layer_checkpoint(tmp_path_factory) -> str:
    """The tiny model cut to one sliding and one full layer, seed 0: the engine tests that run through
    Triton's interpreter take about half the time of the four-layer model's, with both kinds of layer."""
    cfg = dataclasses.replace(preset("tiny"), num_hidden_layers=2)
    return str(write_checkpoint(cfg, tmp_path_factory.mktemp("two_layers") / "original", seed=0))


@pytest.fixture
def gen():
    """A generator on the tests' device (CUDA when there is one) with a fresh random seed, printed so a
    failure can be replayed."""
    seed = int.from_bytes(os.urandom(4), "little")
    print(f"random seed {seed}")
    return torch.Generator("cuda" if torch.cuda.is_available() else "cpu").manual_seed(seed)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    no_gpu = pytest.mark.skip(reason="marked gpu and torch.cuda.is_available() is False")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(no_gpu)
