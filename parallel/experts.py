"""Expert parallelism: tokens travel to the ranks that own their experts and come back.

The exchange has two calls, `dispatch` (token rows out to the expert owners) and `combine`
(expert outputs back, weighted and summed per token), so another transport (DeepEP, NVSHMEM) can
replace this one without touching the model. This one is two `all_to_all_single` with uneven
splits, which NCCL and gloo both provide.

Every rank of the group holds the same tokens (attention is replicated across it), so each rank
first takes its own slice of them; the slices' outputs are gathered again at the end.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel.groups import Group, LayoutError
from parallel.layers import all_gather


def token_slice(n: int, g: Group) -> tuple[int, int]:
    """This rank's share of n tokens: contiguous, sizes differing by at most one."""
    base, extra = divmod(n, g.size)
    lo = g.rank * base + min(g.rank, extra)
    return lo, lo + base + (g.rank < extra)


def gather_token_slices(local: torch.Tensor, n: int, g: Group) -> torch.Tensor:
    """All ranks' token slices (from token_slice) back into one [n, ...] tensor on every rank."""
    if g.size == 1:
        return local
    base, extra = divmod(n, g.size)
    width = base + (extra > 0)
    padded = torch.zeros((width, *local.shape[1:]), dtype=local.dtype, device=local.device)
    padded[: local.shape[0]] = local
    everything = all_gather(padded, g)
    keep = [everything[r * width: r * width + base + (r < extra)] for r in range(g.size)]
    return torch.cat(keep)


@dataclasses.dataclass
class Routed:
    """What dispatch hands to the experts, and what combine needs to undo it."""
    rows: torch.Tensor  # [m, d] token rows this rank's experts must process
    local_expert: torch.Tensor  # [m] index of the expert among this rank's experts
    order: torch.Tensor  # (token, slot) pairs sorted by destination rank
    send_counts: list[int]
    recv_counts: list[int]
    shape: tuple[int, int]  # (tokens, experts per token)


class AllToAllExchange:
    def __init__(self, g: Group, num_experts: int):
        if num_experts % g.size:
            raise LayoutError(f"{num_experts} experts cannot be partitioned evenly over {g.size} ranks")
        self.group = g
        self.per_rank = num_experts // g.size
        self.first_expert = g.rank * self.per_rank

    def _exchange(self, send: torch.Tensor, send_counts: list[int], recv_counts: list[int]) -> torch.Tensor:
        recv = torch.empty((sum(recv_counts), *send.shape[1:]), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(recv, send.contiguous(), output_split_sizes=recv_counts,
                               input_split_sizes=send_counts, group=self.group.group)
        return recv

    def dispatch(self, tokens: torch.Tensor, expert_ids: torch.Tensor) -> Routed:
        """Send each (token, chosen expert) pair's row to the rank that owns the expert."""
        n, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        destination = torch.div(flat, self.per_rank, rounding_mode="floor")
        order = torch.argsort(destination, stable=True)
        rows = tokens[order // k]
        local = flat[order] - destination[order] * self.per_rank
        if self.group.size == 1:
            return Routed(rows, local, order, [n * k], [n * k], (n, k))
        send_counts = torch.bincount(destination, minlength=self.group.size)
        recv_counts = torch.empty_like(send_counts)
        dist.all_to_all_single(recv_counts, send_counts, group=self.group.group)
        send, recv = send_counts.tolist(), recv_counts.tolist()
        return Routed(self._exchange(rows, send, recv), self._exchange(local, send, recv), order, send, recv,
                      (n, k))

    def combine(self, outputs: torch.Tensor, weights: torch.Tensor, routed: Routed) -> torch.Tensor:
        """Expert outputs [m, d] (rows as dispatched) back to their tokens: sum_k weight * output."""
        back = outputs if self.group.size == 1 else self._exchange(outputs, routed.recv_counts,
                                                                    routed.send_counts)
        n, k = routed.shape
        per_pair = torch.empty_like(back)
        per_pair[routed.order] = back  # undo the sort: row i is pair (i // k, i % k) again
        return (per_pair.view(n, k, back.shape[-1]) * weights.unsqueeze(-1).to(per_pair.dtype)).sum(dim=1)
