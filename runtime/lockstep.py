"""Attention data parallelism's lockstep: ranks that plan their own steps agree before each one.

Under `parallel.attention_dp` every rank of a replica schedules its own requests, but the experts are
partitioned over the ranks, so each forward's all-to-alls need every rank, in the same order and of
the same kind. Before each step the ranks exchange a few numbers (one all-reduce over the replica's
gloo group, on the host) and all take the same decision: whether any rank still has work, whether
any asked to stop, whether a forward runs at all, and whether it replays a CUDA graph (then of one
padded size for all: the fixed-capacity exchange needs equal buffers) or runs eagerly (the all-to-all
sized on the host, which takes any token counts). A rank with no rows of its own runs an idle step.
vLLM's data-parallel engines agree the same way (a padded batch, a dummy step where idle).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel.groups import Group


@dataclasses.dataclass(frozen=True)
class Agreement:
    busy: bool  # some rank has requests, or a step still to land
    stop: bool  # some rank was asked to stop
    forward: bool  # some rank has rows this step: every rank runs a forward (its own, or an idle one)
    graph_rows: int | None  # replay graphs padded to hold this many rows, or None: eagerly


class Lockstep:
    def __init__(self, group: Group):
        self.group = group

    def agree(self, busy: bool, stop: bool, rows: int, graphable: bool) -> Agreement:
        """This rank's state (rows of its step, and whether they fit a decode graph) against the
        others': the decision every rank takes."""
        mine = torch.tensor([busy, stop, rows > 0, rows > 0 and not graphable, rows], dtype=torch.int64)
        dist.all_reduce(mine, op=dist.ReduceOp.MAX, group=self.group.group)
        busy_any, stop_any, forward, eager, most = (int(v) for v in mine)
        graph_rows = None if eager or not forward else most
        return Agreement(bool(busy_any), bool(stop_any), bool(forward), graph_rows)
