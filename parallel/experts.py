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


def header_bytes(k: int) -> int:
    """Bytes after each travelling row: its k weights (fp32) and k experts among its owner's (int16),
    rounded up to 16 so that rows stay 16-byte aligned. One collective carries rows, experts and
    weights; on the fixed-capacity path an empty slot's experts are all the sentinel, so no counts
    travel at all."""
    return -(-6 * k // 16) * 16


@dataclasses.dataclass
class Routed:
    """What dispatch hands to this rank's experts, and what combine needs to undo it. A token travels
    once to each rank holding at least one of its experts, whatever the number of them there."""
    rows: torch.Tensor  # [m, d] token rows this rank's experts must process
    experts: torch.Tensor  # [m, k] each row's experts among this rank's; per_rank (one past) on unused slots
    weights: torch.Tensor  # [m, k] fp32 router weights of those experts; 0 on unused slots
    sent: torch.Tensor  # [n, ranks] whether token t travelled to rank r
    slot: torch.Tensor  # [n, ranks] where (t, r) sits in the send buffer (meaningless where not sent)
    send_counts: list[int] | None  # rows to each rank (None: fixed capacity, equal splits)
    recv_counts: list[int] | None

    def pairs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """([m * k, d] rows, [m * k] experts): row i * k + j is row i for its j-th expert slot (an
        unused slot carries the sentinel, whose bucket no kernel computes)."""
        k = self.experts.shape[1]
        return self.rows.repeat_interleave(k, dim=0), self.experts.reshape(-1)


class AllToAllExchange:
    """Two ways to move the rows, one result (rows computed alike; combine sums in the same order):

    - host-sized (`dispatch(..., capacity_tokens=None)`, prefill): the per-rank counts are exchanged
      first (one small all-to-all and a host sync), then the rows with uneven splits, so only real
      rows travel;
    - fixed capacity (`capacity_tokens=T`, CUDA graphs): every rank sends each rank a buffer of T
      rows, the most that T tokens can send one rank (each token goes to a rank at most once), so
      nothing is ever dropped; an empty slot's header names no expert. No host sync, the same shapes
      every step: what a captured graph needs.

    A token goes once to each rank that holds any of its experts, with their weights; that rank sums
    its experts' weighted outputs and sends one row back, and the token's owner adds the ranks' rows
    in rank order (DeepEP's normal mode does the same). Per pair instead, a fixed-capacity buffer
    would hold T x min(k, experts a rank) rows per rank: 4x the bytes for 120b at 8 ranks.
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

    def dispatch(self, tokens: torch.Tensor, expert_ids: torch.Tensor, weights: torch.Tensor,
                 capacity_tokens: int | None = None) -> Routed:
        """Send each token's row, with its experts and weights there, to every rank that owns one of
        its experts. With capacity_tokens (at least this rank's and every other rank's token count)
        the buffers have fixed sizes (see the class)."""
        (n, k), ranks, d = expert_ids.shape, self.group.size, tokens.shape[1]
        owner = torch.div(expert_ids.long(), self.per_rank, rounding_mode="floor")
        # [n, ranks, k]: token t's j-th expert is on rank r (a comparison, not one_hot, whose checks of
        # the values would sync with the host)
        on = owner[:, None, :] == torch.arange(ranks, device=owner.device)[None, :, None]
        sent = on.any(dim=2)
        experts = torch.where(on, (expert_ids.long() - owner * self.per_rank)[:, None, :], self.per_rank)
        weighed = torch.where(on, weights.float()[:, None, :], 0.0)
        if ranks == 1:  # nothing moves
            return Routed(tokens, experts[:, 0], weighed[:, 0], sent,
                          torch.arange(n, device=owner.device)[:, None], [n], [n])
        if capacity_tokens is None:
            counts = sent.sum(dim=0)
            recv_counts = torch.empty_like(counts)
            dist.all_to_all_single(recv_counts, counts, group=self.group.group)
            send, recv = counts.tolist(), recv_counts.tolist()
            # (t, r) at rank r's first row plus the tokens before t sent to r: rank-major, token order
            before = torch.cumsum(sent.long(), dim=0) - sent.long()
            slot = (torch.cumsum(counts, 0) - counts)[None, :] + before
            payload, header_experts, header_weights = self._payload(sum(send), tokens, k, empty_slots=False)
            t, r = sent.T.nonzero(as_tuple=True)[::-1]  # rank-major order: the slots' own
            payload[:, :d] = tokens[t]
            header_experts.copy_(experts[t, r].to(header_experts.dtype))
            header_weights.copy_(weighed[t, r])
        else:
            assert capacity_tokens >= n, (capacity_tokens, n)
            send = recv = None
            slot = torch.arange(ranks, device=owner.device)[None, :] * capacity_tokens + \
                torch.arange(n, device=owner.device)[:, None]
            payload, header_experts, header_weights = self._payload(ranks * capacity_tokens, tokens, k,
                                                                    empty_slots=capacity_tokens > n)
            # every (token, rank) slot written; a rank none of whose experts a token chose gets its row
            # with every expert the sentinel (computed by no kernel, weighed by 0)
            by_rank = payload.view(ranks, capacity_tokens, -1)
            by_rank[:, :n, :d] = tokens[None]
            header_experts.view(ranks, capacity_tokens, k)[:, :n] = experts.transpose(0, 1)
            header_weights.view(ranks, capacity_tokens, k)[:, :n] = weighed.transpose(0, 1)
        received = self._all_to_all(payload, send, recv)
        got_experts, got_weights = self._header(received, d, k)
        return Routed(received[:, :d], got_experts.long(), got_weights, sent, slot, send, recv)

    def _payload(self, rows: int, tokens: torch.Tensor, k: int,
                 empty_slots: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A send buffer of `rows` token rows plus headers, and the headers' experts and weights
        (views). Where some slots stay empty, every expert is first set to the sentinel."""
        d, extra = tokens.shape[1], header_bytes(k) // tokens.element_size()
        payload = torch.empty((rows, d + extra), dtype=tokens.dtype, device=tokens.device)
        experts, weights = self._header(payload, d, k)
        if empty_slots:
            experts.fill_(self.per_rank)
            weights.zero_()
        return payload, experts, weights

    @staticmethod
    def _header(payload: torch.Tensor, d: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """([rows, k] int16 experts, [rows, k] fp32 weights) inside the rows' headers: the weights
        first (4-byte aligned), then the experts."""
        head = payload[:, d:]
        return head.view(torch.int16)[:, 2 * k:3 * k], head.view(torch.float32)[:, :k]

    def weigh(self, outputs: torch.Tensor, routed: Routed) -> torch.Tensor:
        """Per received row, its experts' outputs [m * k, d] (in Routed.pairs order; an unused slot's
        row is never read) weighted and summed in slot order: [m, d], one row per token and rank,
        which is what travels back."""
        m, k = routed.experts.shape
        used = (routed.experts < self.per_rank)[..., None]
        y = outputs.view(m, k, outputs.shape[-1])
        return torch.where(used, y * routed.weights[..., None].to(y.dtype), 0).sum(dim=1)

    def combine(self, summed: torch.Tensor, routed: Routed) -> torch.Tensor:
        """Each received row's weighted sum [m, d] (Routed.weigh; rows of empty slots are never read)
        back to its token, the ranks' parts added in rank order: [n, d]."""
        back = summed if self.group.size == 1 else self._all_to_all(summed.contiguous(), routed.recv_counts,
                                                                    routed.send_counts)
        parts = back[routed.slot.clamp(max=max(back.shape[0] - 1, 0))]  # [n, ranks, d]
        return torch.where(routed.sent[..., None], parts, 0).sum(dim=1)
