"""Tensor-parallel building blocks (Megatron's names, none of its size).

Each layer holds only this rank's shard and records, in `slices`, which part of the full tensor
that is ({dim: [(start, stop), ...]}), so a loader can read exactly those bytes from disk. With a
group of one every layer is the plain layer and every collective is skipped.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.functional import linear

from parallel.groups import Group, LayoutError

Slices = dict[int, list[tuple[int, int]]]
# A matmul y = x W^T + b: torch's by default; the model may pass a faster one (runtime/ops.py).
Matmul = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]
# torch 2.13 renames all_gather_into_tensor (and warns on the old name); older releases have only it.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


# ----------------------------------------------------------------------------------- collectives
def all_reduce(t: torch.Tensor, g: Group) -> torch.Tensor:
    """t summed over the group, in place: through GPU peer memory where the group has it and t is
    small enough (parallel/peer_memory.py), else torch.distributed's (NCCL, gloo)."""
    if g.size > 1:
        if g.peer is not None and g.peer.fits(t):
            return g.peer(t)
        dist.all_reduce(t, group=g.group)
    return t


def all_gather(t: torch.Tensor, g: Group, dim: int = 0) -> torch.Tensor:
    """Equal-sized shards of every rank, concatenated along `dim` in rank order."""
    if g.size == 1:
        return t
    moved = t.movedim(dim, 0).contiguous()
    out = torch.empty((g.size * moved.shape[0], *moved.shape[1:]), dtype=t.dtype, device=t.device)
    _all_gather_single(out, moved, group=g.group)
    return out.movedim(0, dim)


def broadcast(t: torch.Tensor, g: Group) -> torch.Tensor:
    """The group's first rank's `t` on every rank (in place)."""
    if g.size > 1:
        dist.broadcast(t, src=g.first, group=g.group)
    return t


# --------------------------------------------------------------------------------------- sharding
def shard(n: int, g: Group, what: str) -> tuple[int, int]:
    """This rank's [start, stop) of n items split evenly over the group."""
    if n % g.size:
        raise LayoutError(f"{what} ({n}) is not divisible by the {g.size} ranks it is split over")
    part = n // g.size
    return g.rank * part, (g.rank + 1) * part


def take(full: torch.Tensor, slices: Slices | None) -> torch.Tensor:
    """The part of a full tensor that `slices` names (what a rank loads)."""
    out = full
    for dim, ranges in (slices or {}).items():
        out = torch.cat([out.narrow(dim, lo, hi - lo) for lo, hi in ranges], dim=dim)
    return out


def local_shape(shape: tuple[int, ...], slices: Slices | None) -> tuple[int, ...]:
    shape = list(shape)
    for dim, ranges in (slices or {}).items():
        shape[dim] = sum(hi - lo for lo, hi in ranges)
    return tuple(shape)


class Sharded(nn.Module):
    """A module whose buffers are shards: `add(name, full_shape, dtype, slices)` allocates the local part."""

    def __init__(self, device):
        super().__init__()
        self.slices: dict[str, Slices] = {}
        self._device = device

    def add(self, name: str, full_shape: tuple[int, ...], dtype: torch.dtype, slices: Slices | None = None):
        self.register_buffer(name, torch.empty(local_shape(full_shape, slices), dtype=dtype,
                                               device=self._device))
        if slices:
            self.slices[name] = slices


# ------------------------------------------------------------------------------------------ layers
class ColumnParallelLinear(Sharded):
    """y = x W^T + b with output features split over the group; each of `segments` (e.g. q, k, v of a
    fused projection) is split on its own, so every rank gets matching parts of each."""

    def __init__(self, segments: list[int], in_features: int, g: Group, dtype, device, bias: bool = True,
                 what: str = "output features", matmul: Matmul = linear):
        super().__init__(device)
        self.group, self.matmul = g, matmul
        rows, offset = [], 0
        for n in segments:
            lo, hi = shard(n, g, what)
            rows.append((offset + lo, offset + hi))
            offset += n
        self.add("weight", (offset, in_features), dtype, {0: rows})
        if bias:
            self.add("bias", (offset,), dtype, {0: rows})

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x, self.weight, getattr(self, "bias", None))


class RowParallelLinear(Sharded):
    """y = sum over ranks of x_r W_r^T, plus b once (on the first rank): input features split, one
    all-reduce."""

    def __init__(self, in_features: int, out_features: int, g: Group, dtype, device, bias: bool = True,
                 what: str = "input features", matmul: Matmul = linear):
        super().__init__(device)
        self.group, self.matmul = g, matmul
        lo, hi = shard(in_features, g, what)
        self.add("weight", (out_features, in_features), dtype, {1: [(lo, hi)]})
        if bias:
            self.add("bias", (out_features,), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # The bias in the GEMM's epilogue (not one more launch), on the group's first rank only.
        bias = getattr(self, "bias", None) if self.group.rank == 0 else None
        return all_reduce(self.matmul(x, self.weight, bias), self.group)


class VocabParallelEmbedding(Sharded):
    """Embedding rows split over the group: each rank looks up the ids it owns, zeros elsewhere, and
    one all-reduce assembles the rows (exact: every sum has one non-zero term)."""

    def __init__(self, vocab: int, dim: int, g: Group, dtype, device):
        super().__init__(device)
        self.group = g
        self.start, self.stop = shard(vocab, g, "vocabulary size")
        self.add("weight", (vocab, dim), dtype, {0: [(self.start, self.stop)]})

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.group.size == 1:
            return self.weight[ids]
        mine = (ids >= self.start) & (ids < self.stop)
        rows = self.weight[(ids - self.start).clamp(0, self.stop - self.start - 1)]
        return all_reduce(rows * mine[:, None].to(rows.dtype), self.group)


class VocabParallelHead(Sharded):
    """Logits over a vocabulary split by rows; gathered so every rank sees all of them.

    Gathering (rather than sampling from shards) keeps sampling and logprobs one simple exact
    function of the full distribution. It costs M x vocab x 4 bytes per step (51 MB at 64 decoding
    sequences), small beside the 1.16 GB the head itself reads per step.
    """

    def __init__(self, vocab: int, dim: int, g: Group, dtype, device):
        super().__init__(device)
        self.group = g
        self.add("weight", (vocab, dim), dtype, {0: [shard(vocab, g, "vocabulary size")]})

    def forward(self, x: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """[M, vocab] logits, fp32 (widen) or in the weight's dtype (the same values, gathered in half
        the bytes)."""
        logits = linear(x, self.weight)
        return all_gather(logits.float() if widen else logits, self.group, dim=-1)


class ReplicatedLinear(Sharded):
    """A plain linear that every rank holds whole (small ones: the MoE router)."""

    def __init__(self, in_features: int, out_features: int, dtype, device, bias: bool = True):
        super().__init__(device)
        self.add("weight", (out_features, in_features), dtype)
        if bias:
            self.add("bias", (out_features,), dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, getattr(self, "bias", None))
