"""GPT-OSS, readable top to bottom: embed -> [attention -> MoE] x L -> norm -> unembed.

Module and buffer names equal the OpenAI original checkpoint's tensor names
(`block.0.attn.qkv.weight`), so `state_dict()` is the internal naming of runtime/checkpoint.py.

A forward step takes a flat batch of tokens from any number of sequences (prompt chunks and single
decode tokens mixed), each with its absolute position and its sequence's KV cache, and returns
logits only where the caller asks for them. Every operation is a call into runtime/ops.py, which
picks the Triton kernel or the torch reference; both read the same paged step (runtime/step.py).

What each launch fuses on the kernel path, per block (decode, every expert on the rank):
- `ops.qkv_rope_store`: the QKV projection, RoPE on q and k, and k, v into the KV cache (at one row
  of an unsplit layer, one GEMV launch; else the projection, then one RoPE launch that also stores);
- `ops.attention`: paged attention with sinks (split over keys in decode, with a merge launch);
- the output projection (`RowParallelLinear`, all-reduced under tensor parallelism);
- `ops.route`: the residual add, the MoE's RMSNorm, the gate, top-4, softmax, and the rows sorted
  by expert, in one launch;
- `ops.local_experts`: mlp1 + SwiGLU, mlp2, then the weighted combine, the residual add and the
  NEXT block's attention RMSNorm in the last launch, so the next block starts from its normed input.
The reference path (and expert parallelism, whose partial sums or exchanged rows come between
these steps) runs each step on its own; `Block` states the contract both keep.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from parallel.experts import AllToAllExchange, held_here
from parallel.groups import LayoutError, Parallel, single
from parallel.layers import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, Sharded,
                             VocabParallelEmbedding, VocabParallelHead, all_reduce, shard, take)
from runtime import mxfp4, ops
from runtime.checkpoint import CheckpointReader, random_tensor, tensor_specs
from runtime.config import ModelConfig
from runtime.kernels.rope import yarn_frequencies
from runtime.kv_cache import PagePool, SequenceKV, page_bytes
from runtime.step import PagedStep, Step


@dataclasses.dataclass
class StepContext:
    """What every layer of one step shares: the RoPE inputs and the paged view of the KV cache."""
    rotary: ops.Rotary
    paged: PagedStep


class Attention(Sharded):
    """Heads split over the tensor-parallel group: column-parallel QKV, row-parallel output."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype, parallel: Parallel):
        super().__init__(parallel.device)
        self.cfg, self.layer, tp, dev = cfg, layer, parallel.tp, parallel.device
        if cfg.num_key_value_heads % tp.size:
            raise LayoutError(f"parallel.tp ({tp.size}) must divide the {cfg.num_key_value_heads} KV heads "
                              f"(and the {cfg.num_attention_heads} query heads)")
        self.heads, self.kv_heads = cfg.num_attention_heads // tp.size, cfg.num_key_value_heads // tp.size
        self.norm = Sharded(dev)
        self.norm.add("scale", (cfg.hidden_size,), torch.float32)
        matmul = ops.linear_for(tp.size)
        self.qkv = ColumnParallelLinear([cfg.q_width, cfg.kv_width, cfg.kv_width], cfg.hidden_size, tp, dtype,
                                        dev, matmul=matmul)
        self.add("sinks", (cfg.num_attention_heads,), torch.float32,
                 {0: [shard(cfg.num_attention_heads, tp, "query heads")]})
        self.out = RowParallelLinear(cfg.q_width, cfg.hidden_size, tp, dtype, dev, matmul=matmul)
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)

    def project(self, x: torch.Tensor, ctx: StepContext, h: torch.Tensor | None = None) -> torch.Tensor:
        """q [N, heads, head_dim]: the QKV projection of x's RMSNorm, rotated, with k and v stored in
        the cache. h: that norm, where the block before computed it (fused with its MoE combine)."""
        cfg = self.cfg
        if h is None:
            _, h = ops.add_rms_norm(x, None, self.norm.scale, cfg.rms_norm_eps)
        return ops.qkv_rope_store(h, self.qkv, self.heads, self.kv_heads, cfg.head_dim, ctx.rotary,
                                  ctx.paged.layers(self.window is not None), self.layer)

    def attend(self, q: torch.Tensor, paged: PagedStep, out: torch.Tensor | None = None) -> torch.Tensor:
        """[N, heads, head_dim]: q's attention over the cache (into `out` where given)."""
        return ops.attention(q, paged, paged.layers(self.window is not None), self.layer, self.sinks,
                             self.sm_scale, self.window, out)


class MoE(Sharded):
    """Router on every rank; experts partitioned over `experts_partition` ranks (tokens exchanged
    all-to-all) and each expert's intermediate dimension split over `experts_split` ranks."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype, parallel: Parallel):
        super().__init__(parallel.device)
        self.cfg, dev = cfg, parallel.device
        self.split, self.partition = parallel.experts_split, parallel.experts_partition
        # Attention replicated over the partition: every rank of the replica holds the same tokens,
        # runs its own experts on them and one all-reduce over the replica sums the parts. Under
        # attention_dp each rank's tokens are its own: they travel to the experts' owners and back.
        self.replica = parallel.replica
        self.tokens_shared = parallel.tokens_shared
        E, d, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.exchange = AllToAllExchange(self.partition, E)
        experts = [(self.exchange.first_expert, self.exchange.first_expert + self.exchange.per_rank)]
        lo, hi = shard(I, self.split, "intermediate_size")
        if (hi - lo) % mxfp4.BLOCK:
            raise LayoutError(f"intermediate_size ({I}) split {self.split.size} ways gives {hi - lo} "
                              f"columns per rank, not a multiple of the {mxfp4.BLOCK}-value MXFP4 block; "
                              f"choose another parallel.expert_tp (1 partitions whole experts instead)")
        g, b = mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK
        self.norm = Sharded(dev)
        self.norm.add("scale", (d,), torch.float32)
        self.gate = ReplicatedLinear(d, E, dtype, dev)
        self.mlp1_weight = Sharded(dev)
        self.mlp1_weight.add("blocks", (E, 2 * I, d // g, b), torch.uint8,
                             {0: experts, 1: [(2 * lo, 2 * hi)]})
        self.mlp1_weight.add("scales", (E, 2 * I, d // g), torch.uint8, {0: experts, 1: [(2 * lo, 2 * hi)]})
        self.mlp2_weight = Sharded(dev)
        self.mlp2_weight.add("blocks", (E, d, I // g, b), torch.uint8, {0: experts, 2: [(lo // g, hi // g)]})
        self.mlp2_weight.add("scales", (E, d, I // g), torch.uint8, {0: experts, 2: [(lo // g, hi // g)]})
        self.add("mlp1_bias", (E, 2 * I), dtype, {0: experts, 1: [(2 * lo, 2 * hi)]})
        self.add("mlp2_bias", (E, d), dtype, {0: experts})
        self.load: torch.Tensor | None = None  # [E] rows routed to each expert, where counted

    @property
    def experts(self) -> ops.ExpertWeights:
        return ops.ExpertWeights(self.mlp1_weight.blocks, self.mlp1_weight.scales, self.mlp1_bias,
                                 self.mlp2_weight.blocks, self.mlp2_weight.scales, self.mlp2_bias,
                                 self.cfg.swiglu_limit)

    def forward(self, x: torch.Tensor, delta: torch.Tensor, next_norm: torch.Tensor | None = None,
                fixed_shapes: bool = False,
                real_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(r + MoE(h), and that sum's RMSNorm under next_norm (the next block's attention norm scale)
        where the kernels compute it in their last launch, else None), where r = x + delta is the
        residual after attention (delta: the attention block's output) and h is r's RMSNorm under
        this MoE's norm. fixed_shapes: exchange fixed-capacity buffers (a CUDA graph's step);
        real_rows: which rows count for the load (PagedStep.real_rows)."""
        cfg, eps = self.cfg, self.cfg.rms_norm_eps
        reduce = (lambda t: all_reduce(t, self.split)) if self.split.size > 1 else None
        r = ops.route(x, delta, self.norm.scale, eps, self.gate.weight, self.gate.bias, cfg.experts_per_token,
                      all_experts_here=self.partition.size == 1)
        if self.load is not None:  # on the device, no sync: inside the graphs too
            k = r.expert_ids.shape[1]
            counts = torch.ones_like(r.expert_ids, dtype=torch.int64) if real_rows is None \
                else real_rows[:, None].expand(-1, k)
            self.load.scatter_add_(0, r.expert_ids.reshape(-1).long(), counts.reshape(-1))
        norm = (next_norm, eps) if next_norm is not None else None
        if r.plan is not None:  # the kernels took the rows sorted by expert: the rest is one call
            return ops.local_experts(r, self.experts, reduce, first=self.split.rank == 0, next_norm=norm)
        if self.tokens_shared:  # no rows move: this rank's experts' share, summed over the replica
            ex = self.exchange
            ids, weights = held_here(r.expert_ids, r.weights, ex.first_expert, ex.per_rank)
            return ops.shared_token_experts(r, ids, weights, self.experts,
                                            lambda t: all_reduce(t, self.replica),
                                            bias_here=self.split.rank == 0, next_norm=norm)
        # attention_dp: each rank sends its rows to their experts' owners and gets the weighted sums
        # back; in a graph every rank's step has the agreed size (runtime/lockstep.py).
        routed = self.exchange.dispatch(r.h, r.expert_ids, r.weights, x.shape[0] if fixed_shapes else None)
        y = ops.expert_rows(*routed.pairs(), self.experts, reduce)
        out = self.exchange.combine(self.exchange.weigh(y, routed), routed)
        return r.residual + out.to(x.dtype), None


class Block(nn.Module):
    """The block's math, with its residual adds:

        r = x + attention(rms_norm(x))          # h = rms_norm(x), when the block before gave it
        y = r + moe(rms_norm(r))
        returns (y, rms_norm(y) under next_norm, or None)

    in two halves around the attention itself, which GptOss.pieces runs apart: `before_attention`
    (the norm, the QKV projection with RoPE, k and v into the cache: q) and `after_attention` (the
    output projection and the MoE). The fusion contract: the attention returns its output without
    the residual; the MoE adds both residuals (x + delta in its first launch, fused with its norm; r +
    the experts' sum in its last), and where the kernels can it also returns the next block's
    attention input rms_norm(y), which that block then takes as `h` instead of computing it."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype, parallel: Parallel):
        super().__init__()
        self.attn = Attention(cfg, layer, dtype, parallel)
        self.mlp = MoE(cfg, layer, dtype, parallel)

    def before_attention(self, x: torch.Tensor, ctx: StepContext, h: torch.Tensor | None) -> torch.Tensor:
        return self.attn.project(x, ctx, h)

    def after_attention(self, x: torch.Tensor, out: torch.Tensor, ctx: StepContext,
                        next_norm: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(y, rms_norm(y) or None) from x and the attention's output `out`."""
        delta = self.attn.out(out.flatten(-2))  # this rank's partial sum, all-reduced
        return self.mlp(x, delta, next_norm, ctx.paged.fixed_shapes, ctx.paged.real_rows)


def in_memory_order(name: str, tensor: torch.Tensor) -> torch.Tensor:
    """A checkpoint tensor as the model keeps it: the experts' MXFP4 blocks in kernel order (each
    block's bytes transposed, mxfp4.quad_transpose: the order every MoE kernel and the reference read),
    everything else as read. Blocks are never split inside, so a shard's slices transpose alike."""
    return mxfp4.quad_transpose(tensor) if name.endswith("_weight.blocks") else tensor


class GptOss(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16,
                 device: torch.device | str = "cpu", parallel: Parallel | None = None,
                 kv_dtype: torch.dtype | None = None):
        super().__init__()
        parallel = parallel or single(device)
        self.cfg, self.dtype, self.parallel = cfg, dtype, parallel
        self.kv_dtype = kv_dtype or dtype  # the KV pages' (kv_cache.resolve_kv_cache_dtype)
        dev, tp = parallel.device, parallel.tp
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, dev)
        self.block = nn.ModuleList(Block(cfg, n, dtype, parallel) for n in range(cfg.num_hidden_layers))
        self.norm = Sharded(dev)
        self.norm.add("scale", (cfg.hidden_size,), torch.float32)
        self.unembedding = VocabParallelHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, dev)
        self.pool: PagePool | None = None  # the KV pages, made with the first sequence's cache
        self.sliding_pool: PagePool | None = None
        inv_freq, self.concentration = yarn_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
            cfg.rope_ntk_alpha, cfg.rope_ntk_beta)
        self.inv_freq = inv_freq.to(dev)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def make_pool(self, num_pages: int | None = None, sliding_pages: int | None = None) -> PagePool:
        """The KV page pools: the full layers' (`num_pages` fixed pages, or None for a small pool that
        grows on demand) and the sliding layers' (`sliding_pages`, or growing), which needs only each
        running sequence's window. Returns the full layers' pool, the one the scheduler manages."""
        cfg, heads = self.cfg, self.block[0].attn.kv_heads
        full, sliding = cfg.layers(sliding=False), cfg.layers(sliding=True)
        self.pool = PagePool(full, heads, cfg.head_dim, self.kv_dtype, self.device,
                             num_pages=num_pages or 64, growable=num_pages is None)
        self.sliding_pool = PagePool(sliding, heads, cfg.head_dim, self.kv_dtype, self.device,
                                     num_pages=sliding_pages or 16, growable=sliding_pages is None) \
            if sliding else None
        return self.pool

    def kv_page_bytes(self, sliding: bool = False) -> int:
        """Bytes of one page id in the full (or the sliding) layers' pool: keys and values of this
        rank's KV heads in every layer of that kind."""
        cfg = self.cfg
        return page_bytes(len(cfg.layers(sliding)), self.block[0].attn.kv_heads, cfg.head_dim, self.kv_dtype)

    def new_cache(self) -> SequenceKV:
        """A KV cache for one sequence (pages of this rank's KV heads in the model's pools)."""
        if self.pool is None:
            self.make_pool()
        return SequenceKV(self.pool, self.sliding_pool, self.cfg.sliding_window)

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        """Next-token logits [M, vocab] in fp32 for the tokens at step.logits_indices (on every rank)."""
        return self.forward_paged(step.token_ids, step.positions, PagedStep.of(step.chunks, self.device),
                                  step.logits_indices)

    @torch.inference_mode()
    def forward_paged(self, token_ids: torch.Tensor, positions: torch.Tensor, paged: PagedStep,
                      logits_indices: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """The forward from device tensors alone (no host work, no sync on the kernel path), so that
        runtime/cuda_graphs.py can capture it. widen: see `logits`."""
        pieces = self.pieces(token_ids, positions, paged)
        attention, q = next(pieces)
        while True:
            try:
                attention, q = pieces.send(attention.attend(q, paged))
            except StopIteration as end:
                return self.logits(end.value, logits_indices, widen)

    def pieces(self, token_ids: torch.Tensor, positions: torch.Tensor, paged: PagedStep):
        """The forward without its attentions and its logits: a generator that yields (the layer's
        Attention, q) where each layer's attention would run, takes that attention's output back
        (`send`), and returns the last block's output x [N, hidden]. forward_paged runs each attention
        in place; runtime/mixed_graphs.py captures the pieces between them as CUDA graphs."""
        ctx = StepContext(ops.Rotary(positions, self.inv_freq, self.concentration), paged)
        x, h = self.embedding(token_ids), None
        for n, block in enumerate(self.block):
            # Where the kernels can, this block's last launch also computes the next block's attention norm.
            following = self.block[n + 1].attn.norm.scale if n + 1 < len(self.block) else None
            out = yield block.attn, block.before_attention(x, ctx, h)
            x, h = block.after_attention(x, out, ctx, following)
        return x

    def logits(self, x: torch.Tensor, logits_indices: torch.Tensor, widen: bool = True) -> torch.Tensor:
        """Next-token logits [M, vocab] of x's rows at logits_indices (on every rank): in fp32, or with
        widen=False in the head's own dtype (the same values: the caller widens them as it copies
        them, as the decode graphs do into their fp32 buffer, without an fp32 temporary between)."""
        normed = ops.rms_norm(x[logits_indices], self.norm.scale, self.cfg.rms_norm_eps)
        return self.unembedding(normed, widen)

    # ------------------------------------------------------------------------------- weights
    def count_expert_load(self) -> None:
        """Count from now on the rows each layer's router sends each expert (zeroed in place, so CUDA
        graphs captured while counting keep counting into the same tensors)."""
        for block in self.block:
            if block.mlp.load is None:
                block.mlp.load = torch.zeros(self.cfg.num_experts, dtype=torch.int64, device=self.device)
            else:
                block.mlp.load.zero_()

    def expert_load(self) -> torch.Tensor | None:
        """[layers, experts] rows this rank's router sent each expert since counting began, or None."""
        if self.block[0].mlp.load is None:
            return None
        return torch.stack([block.mlp.load for block in self.block])

    def shards(self):
        """(checkpoint name, local tensor, slices of the full tensor it holds) for every weight."""
        for module_name, module in self.named_modules():
            slices = getattr(module, "slices", {})
            for name, tensor in module.named_buffers(recurse=False):
                yield f"{module_name}.{name}" if module_name else name, tensor, slices.get(name)

    def load(self, reader: CheckpointReader) -> "GptOss":
        """Read this rank's part of every tensor (validated first, so a bad checkpoint fails before any
        copy). Only the bytes of the owned slices are read from disk."""
        if reader.config != self.cfg:
            raise ValueError(f"{reader.path}: config.json describes another model than the one being built")
        reader.validate()
        for name, tensor, slices in self.shards():
            tensor.copy_(in_memory_order(name, reader.read(name, slices)))
        return self

    def randomize(self, seed: int = 0) -> "GptOss":
        """Random weights drawn on the model's device (the `checkpoint=dummy` load for benchmarks).

        Each full tensor is drawn, then cut to this rank's slice, so every layout holds the same model.
        """
        specs = tensor_specs(self.cfg)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, tensor, slices in self.shards():
            drawn = take(random_tensor(specs[name], generator, self.device), slices)
            tensor.copy_(in_memory_order(name, drawn))
        return self
