"""Expert parallelism: each rank holds some of the experts; a token's pairs reach them two ways.

- Every rank of the replica holds the same tokens (attention replicated or tensor-parallel, the
  default): no rows travel. Each rank runs the experts it holds on the (token, expert) pairs routed
  to them (`held_here` masks the others) and one all-reduce over the replica sums the partial
  outputs (vLLM's expert parallelism without data parallelism). At decode sizes that all-reduce is
  one small collective a layer instead of two exchanges and a gather; at prefill sizes it moves no
  more bytes than the exchange up to 4 ranks.
- Each rank holds its own tokens (attention_dp): the rows travel to their experts' owners and back,
  `dispatch` and `combine`, so another transport (DeepEP, NVSHMEM) can replace this one without
  touching the model. This one is `all_to_all_single`, which NCCL and gloo both provide: with uneven
  splits sized on the host, or with fixed-capacity buffers for CUDA graphs.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

from parallel.groups import Group, LayoutError


def held_here(expert_ids: torch.Tensor, weights: torch.Tensor, first_expert: int,
              per_rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(expert ids among this rank's, weights) of [n, k] pairs for the rank holding experts
    first_expert .. first_expert + per_rank - 1: a pair whose expert is elsewhere gets id per_rank
    (one past the last: no kernel computes it) and weight 0 (its row is never read)."""
    local = expert_ids.long() - first_expert
    mine = (local >= 0) & (local < per_rank)
    return torch.where(mine, local, per_rank).to(expert_ids.dtype), torch.where(mine, weights, 0)


# Each row travels with a 16-byte header (so rows stay 16-byte aligned) whose first int16 is the row's
# expert among its owner's: one collective carries both, and on the fixed-capacity path the header's
# sentinel marks the empty slots, so no counts travel at all.
HEADER_BYTES = 16


@dataclasses.dataclass
class Routed:
    """What dispatch hands to the experts, and what combine needs to undo it."""
    rows: torch.Tensor  # [m, d] token rows this rank's experts must process
    local_expert: torch.Tensor  # [m] the row's expert among this rank's; per_rank (one past) on empty slots
    slot: torch.Tensor  # [n * k] where pair (token, j) = row token * k + j sits in the send buffer
    send_counts: list[int] | None  # rows to each rank (None: fixed capacity, equal splits)
    recv_counts: list[int] | None
    shape: tuple[int, int]  # (tokens, experts per token)


class AllToAllExchange:
    """Two ways to move the rows, one result (rows computed alike; combine sums in the same order):

    - host-sized (`dispatch(..., capacity_tokens=None)`, prefill): the per-rank counts are exchanged
      first (one small all-to-all and a host sync), then the rows with uneven splits, so only real
      rows travel;
    - fixed capacity (`capacity_tokens=T`, CUDA graphs): every rank sends each rank a buffer of
      T x min(k, experts per rank) rows, the most that T tokens can send one rank, so nothing is ever
      dropped; the slots are computed on the device and an empty slot's header names no expert. No
      host sync, the same shapes every step: what a captured graph needs.
    """

    def __init__(self, g: Group, num_experts: int):
        if num_experts % g.size:
            raise LayoutError(f"{num_experts} experts cannot be partitioned evenly over {g.size} ranks")
        self.group = g
        self.per_rank = num_experts // g.size
        self.first_expert = g.rank * self.per_rank

    def _all_to_all(self, send: torch.Tensor, send_counts: list[int] | None,
                    recv_counts: list[int] | None) -> torch.Tensor:
        rows = send.shape[0] if recv_counts is None else sum(recv_counts)
        recv = torch.empty((rows, *send.shape[1:]), dtype=send.dtype, device=send.device)
        dist.all_to_all_single(recv, send, output_split_sizes=recv_counts, input_split_sizes=send_counts,
                               group=self.group.group)
        return recv

    def dispatch(self, tokens: torch.Tensor, expert_ids: torch.Tensor,
                 capacity_tokens: int | None = None) -> Routed:
        """Send each (token, chosen expert) pair's row to the rank that owns the expert. With
        capacity_tokens (at least this rank's and every other rank's token count) the buffers have
        fixed sizes (see the class)."""
        n, k = expert_ids.shape
        flat = expert_ids.reshape(-1)
        destination = torch.div(flat, self.per_rank, rounding_mode="floor")
        local = flat - destination * self.per_rank
        if self.group.size == 1:  # nothing moves: the rows in pair order
            return Routed(tokens.repeat_interleave(k, dim=0), local, torch.arange(n * k, device=flat.device),
                          [n * k], [n * k], (n, k))
        if capacity_tokens is None:
            send_counts = torch.bincount(destination, minlength=self.group.size)
            recv_counts = torch.empty_like(send_counts)
            dist.all_to_all_single(recv_counts, send_counts, group=self.group.group)
            send, recv = send_counts.tolist(), recv_counts.tolist()
            order = torch.argsort(destination, stable=True)
            slot = torch.empty_like(order)
            slot[order] = torch.arange(n * k, device=flat.device)
            buffer_rows = n * k
        else:
            assert capacity_tokens >= n, (capacity_tokens, n)
            send = recv = None
            capacity = capacity_tokens * min(k, self.per_rank)
            # A pair's place among the pairs for its rank, in pair order: a running count per rank
            # (a comparison, not one_hot, whose checks of the values would sync with the host).
            to_rank = (destination[:, None] == torch.arange(self.group.size, device=flat.device)).long()
            earlier = (torch.cumsum(to_rank, 0) - to_rank).gather(1, destination[:, None]).squeeze(1)
            slot = destination * capacity + earlier
            buffer_rows = self.group.size * capacity
        payload, expert_of_row = self._payload(buffer_rows, tokens, empty_slots=buffer_rows > n * k)
        payload[slot, : tokens.shape[1]] = tokens.repeat_interleave(k, dim=0)
        expert_of_row[slot] = local.to(expert_of_row.dtype)
        received = self._all_to_all(payload, send, recv)
        d = tokens.shape[1]
        return Routed(received[:, :d], self._header(received, d).long(), slot, send, recv, (n, k))

    def _payload(self, rows: int, tokens: torch.Tensor,
                 empty_slots: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """A send buffer of `rows` token rows plus headers, and the headers' expert ids (a view). Where
        some slots stay empty, every id is first set to the sentinel (no expert here)."""
        d, extra = tokens.shape[1], HEADER_BYTES // tokens.element_size()
        payload = torch.empty((rows, d + extra), dtype=tokens.dtype, device=tokens.device)
        expert_of_row = self._header(payload, d)
        if empty_slots:
            expert_of_row.fill_(self.per_rank)
        return payload, expert_of_row

    @staticmethod
    def _header(payload: torch.Tensor, d: int) -> torch.Tensor:
        return payload[:, d:].view(torch.int16)[:, 0]

    def combine(self, outputs: torch.Tensor, weights: torch.Tensor, routed: Routed) -> torch.Tensor:
        """Expert outputs [m, d] (rows as dispatched; empty slots' rows are never read) back to their
        tokens: sum_k weight * output, in slot order j = 0..k-1 on both paths."""
        back = outputs if self.group.size == 1 else self._all_to_all(outputs.contiguous(), routed.recv_counts,
                                                                     routed.send_counts)
        n, k = routed.shape
        per_pair = back[routed.slot]  # row i is pair (i // k, i % k)
        return (per_pair.view(n, k, back.shape[-1]) * weights.unsqueeze(-1).to(per_pair.dtype)).sum(dim=1)
