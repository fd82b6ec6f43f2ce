"""Telling rounding from bugs when two runs of a random model disagree.

Two computations of the same tokens (one forward vs prefill + decode, kernels vs references) differ by
rounding only, ~1e-6 in fp32. But a random 24-layer model routes each token to the top 4 of 32
experts, and where the 4th and 5th router logits are nearly tied such a difference can swap them:
that token's output moves by O(0.1), and every later token attending to it moves too. So the tests
record the router logits of both runs, find the first (position, layer) whose chosen experts differ,
check that it was a near tie (a real bug changes routes without one), and compare logits only before it.
"""

from __future__ import annotations

import dataclasses

import torch

import runtime.ops


class RouteRecorder:
    """Records the router logits of every routing the model does while installed (the reference's
    `route` and each router kernel)."""

    def __init__(self, monkeypatch, num_layers: int):
        self.num_layers, self.calls = num_layers, []
        original = runtime.ops.route_reference

        def recording_route(logits, k):
            self.calls.append(logits.detach().float().cpu())
            return original(logits, k)

        monkeypatch.setattr(runtime.ops, "route_reference", recording_route)
        try:  # the kernel path routes in one Triton kernel: record the gate's logits beside it
            import runtime.kernels.router_triton as router_triton
        except ImportError:  # no triton installed: only the reference path runs
            return
        original_triton = router_triton.route_triton

        def recording_route_triton(h, weight, bias, k, ids_dtype=torch.int64):
            self.calls.append(torch.nn.functional.linear(h, weight, bias).detach().float().cpu())
            return original_triton(h, weight, bias, k, ids_dtype)

        monkeypatch.setattr(router_triton, "route_triton", recording_route_triton)
        original_plan = router_triton.route_and_plan

        def recording_route_and_plan(h, weight, bias, k):
            self.calls.append(torch.nn.functional.linear(h, weight, bias).detach().float().cpu())
            return original_plan(h, weight, bias, k)

        monkeypatch.setattr(router_triton, "route_and_plan", recording_route_and_plan)
        original_fused = router_triton.norm_route_and_plan

        def recording_norm_route_and_plan(x, delta, gain, eps, weight, bias, k):
            out = original_fused(x, delta, gain, eps, weight, bias, k)
            self.calls.append(torch.nn.functional.linear(out[1], weight, bias).detach().float().cpu())
            return out

        monkeypatch.setattr(router_triton, "norm_route_and_plan", recording_norm_route_and_plan)

    def take(self) -> list[torch.Tensor]:
        """Router logits per layer [positions, experts] over the steps since the last take (steps
        call the layers in order, so every num_layers calls are one step)."""
        calls, self.calls = self.calls, []
        assert len(calls) % self.num_layers == 0, len(calls)
        return [torch.cat(calls[layer::self.num_layers]) for layer in range(self.num_layers)]


@dataclasses.dataclass
class RouteChange:
    position: int
    layer: int
    gap: float  # the smaller of the two runs' (4th - 5th largest router logit) there
    scale: float  # the largest |router logit| at that position and layer


def first_route_change(a: list[torch.Tensor], b: list[torch.Tensor], k: int) -> RouteChange | None:
    """The earliest position (then layer) whose top-k expert set differs between two runs."""
    n = min(a[0].shape[0], b[0].shape[0])
    for position in range(n):
        for layer, (la, lb) in enumerate(zip(a, b)):
            ta, tb = torch.topk(la[position], k + 1), torch.topk(lb[position], k + 1)
            if set(ta.indices[:k].tolist()) != set(tb.indices[:k].tolist()):
                gap = min(float(t.values[k - 1] - t.values[k]) for t in (ta, tb))
                return RouteChange(position, layer, gap, float(la[position].abs().max()))
    return None


def all_pages(model) -> list[torch.Tensor]:
    """Every key and value page array of the model's KV pools (to poison them in tests)."""
    pools = [p for p in (model.pool, model.sliding_pool) if p is not None]
    return [t for pool in pools for store in (pool.keys, pool.values) for t in store.values()]


def poison(model):
    """Fill the KV pool with NaN: a slot read before it is written shows up in the logits."""
    model.new_cache().release()  # makes the pool
    for pages in all_pages(model):
        pages.fill_(float("nan"))
