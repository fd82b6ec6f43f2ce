"""GPT-OSS, readable top to bottom: embed -> [attention -> MoE] x L -> norm -> unembed.

Module and buffer names equal the OpenAI original checkpoint's tensor names
(`block.0.attn.qkv.weight`), so `state_dict()` is the internal naming of runtime/checkpoint.py.

A forward step takes a flat batch of tokens from any number of sequences (prompt chunks and single
decode tokens mixed), each with its absolute position and its sequence's KV cache, and returns
logits only where the caller asks for them.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from parallel.experts import AllToAllExchange, gather_token_slices, token_slice
from parallel.groups import LayoutError, Parallel, single
from parallel.layers import (ColumnParallelLinear, ReplicatedLinear, RowParallelLinear, Sharded,
                             VocabParallelEmbedding, VocabParallelHead, all_reduce, shard, take)
from runtime import mxfp4
from runtime.checkpoint import CheckpointReader, random_tensor, tensor_specs
from runtime.config import ModelConfig
from runtime.kernels import use_triton
from runtime.kernels.attention import attention
from runtime.kernels.moe import expert_rows, route
from runtime.kernels.rmsnorm import rms_norm
from runtime.kernels.rope import apply_rope, cos_sin, yarn_frequencies
from runtime.kv_cache import SequenceKV


@dataclasses.dataclass
class SequenceChunk:
    """The tokens of one sequence in this step: positions start .. start + length - 1."""
    start: int
    length: int
    cache: SequenceKV


@dataclasses.dataclass
class Step:
    token_ids: torch.Tensor  # [N] int64, the sequences' chunks concatenated in order
    positions: torch.Tensor  # [N] int64, absolute position of each token
    chunks: list[SequenceChunk]
    logits_indices: torch.Tensor  # [M] int64, flat indices whose next-token logits are wanted


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
        self.qkv = ColumnParallelLinear([cfg.q_width, cfg.kv_width, cfg.kv_width], cfg.hidden_size, tp, dtype, dev)
        self.add("sinks", (cfg.num_attention_heads,), torch.float32,
                 {0: [shard(cfg.num_attention_heads, tp, "query heads")]})
        self.out = RowParallelLinear(cfg.q_width, cfg.hidden_size, tp, dtype, dev)
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.norm.scale, cfg.rms_norm_eps)
        q, k, v = self.qkv(h).split([self.heads * cfg.head_dim, self.kv_heads * cfg.head_dim,
                                     self.kv_heads * cfg.head_dim], dim=-1)
        q = apply_rope(q.unflatten(-1, (-1, cfg.head_dim)), cos, sin)
        k = apply_rope(k.unflatten(-1, (-1, cfg.head_dim)), cos, sin)
        v = v.unflatten(-1, (-1, cfg.head_dim))
        outputs, offset = [], 0
        for chunk in step.chunks:
            rows = slice(offset, offset + chunk.length)
            offset += chunk.length
            chunk.cache.write(self.layer, chunk.start, k[rows], v[rows])
            end = chunk.start + chunk.length
            # A sliding layer's first query (at `start`) sees nothing older than start - window + 1.
            first_key = 0 if self.window is None else max(0, chunk.start - self.window + 1)
            keys, values = chunk.cache.read(self.layer, first_key, end)
            outputs.append(attention(q[rows], keys, values, self.sinks, q_start=chunk.start,
                                     k_start=first_key, sm_scale=self.sm_scale, window=self.window))
        return x + self.out(torch.cat(outputs).flatten(-2))


class MoE(Sharded):
    """Router on every rank; experts partitioned over `experts_partition` ranks (tokens exchanged
    all-to-all) and each expert's intermediate dimension split over `experts_split` ranks."""

    def __init__(self, cfg: ModelConfig, layer: int, dtype, parallel: Parallel):
        super().__init__(parallel.device)
        self.cfg, dev = cfg, parallel.device
        self.split, self.partition = parallel.experts_split, parallel.experts_partition
        E, d, I = cfg.num_experts, cfg.hidden_size, cfg.intermediate_size
        self.exchange = AllToAllExchange(self.partition, E)
        experts = [(self.exchange.first_expert, self.exchange.first_expert + self.exchange.per_rank)]
        lo, hi = shard(I, self.split, "intermediate_size")
        if (hi - lo) % mxfp4.BLOCK:
            raise LayoutError(f"intermediate_size ({I}) split {self.split.size} ways gives {hi - lo} columns per rank,"
                              f" not a multiple of the {mxfp4.BLOCK}-value MXFP4 block; choose another "
                              f"parallel.expert_tp (1 partitions whole experts instead)")
        g, b = mxfp4.BLOCK, mxfp4.BYTES_PER_BLOCK
        self.norm = Sharded(dev)
        self.norm.add("scale", (d,), torch.float32)
        self.gate = ReplicatedLinear(d, E, dtype, dev)
        self.mlp1_weight = Sharded(dev)
        self.mlp1_weight.add("blocks", (E, 2 * I, d // g, b), torch.uint8, {0: experts, 1: [(2 * lo, 2 * hi)]})
        self.mlp1_weight.add("scales", (E, 2 * I, d // g), torch.uint8, {0: experts, 1: [(2 * lo, 2 * hi)]})
        self.mlp2_weight = Sharded(dev)
        self.mlp2_weight.add("blocks", (E, d, I // g, b), torch.uint8, {0: experts, 2: [(lo // g, hi // g)]})
        self.mlp2_weight.add("scales", (E, d, I // g), torch.uint8, {0: experts, 2: [(lo // g, hi // g)]})
        self.add("mlp1_bias", (E, 2 * I), dtype, {0: experts, 1: [(2 * lo, 2 * hi)]})
        self.add("mlp2_bias", (E, d), dtype, {0: experts})

    def _expert_rows(self):
        if use_triton(self.mlp1_bias):
            from runtime.kernels.moe_gemm import expert_rows_triton

            return expert_rows_triton
        return expert_rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.norm.scale, cfg.rms_norm_eps)
        expert_ids, weights = route(self.gate(h), cfg.experts_per_token)
        lo, hi = token_slice(x.shape[0], self.partition)
        routed = self.exchange.dispatch(h[lo:hi], expert_ids[lo:hi])
        reduce = (lambda t: all_reduce(t, self.split)) if self.split.size > 1 else None
        y = self._expert_rows()(routed.rows, routed.local_expert, self.mlp1_weight.blocks, self.mlp1_weight.scales,
                        self.mlp1_bias, self.mlp2_weight.blocks, self.mlp2_weight.scales,
                        self.mlp2_bias, cfg.swiglu_limit, reduce)
        out = self.exchange.combine(y, weights[lo:hi], routed)
        return x + gather_token_slices(out, x.shape[0], self.partition).to(x.dtype)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, dtype, parallel: Parallel):
        super().__init__()
        self.attn = Attention(cfg, layer, dtype, parallel)
        self.mlp = MoE(cfg, layer, dtype, parallel)

    def forward(self, x, cos, sin, step):
        return self.mlp(self.attn(x, cos, sin, step))


class GptOss(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu",
                 parallel: Parallel | None = None):
        super().__init__()
        parallel = parallel or single(device)
        self.cfg, self.dtype, self.parallel = cfg, dtype, parallel
        dev, tp = parallel.device, parallel.tp
        self.embedding = VocabParallelEmbedding(cfg.vocab_size, cfg.hidden_size, tp, dtype, dev)
        self.block = nn.ModuleList(Block(cfg, n, dtype, parallel) for n in range(cfg.num_hidden_layers))
        self.norm = Sharded(dev)
        self.norm.add("scale", (cfg.hidden_size,), torch.float32)
        self.unembedding = VocabParallelHead(cfg.vocab_size, cfg.hidden_size, tp, dtype, dev)
        self.inv_freq, self.concentration = yarn_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
            cfg.rope_ntk_alpha, cfg.rope_ntk_beta)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def new_cache(self) -> SequenceKV:
        """A KV cache for one sequence, holding this rank's KV heads."""
        cfg, heads = self.cfg, self.block[0].attn.kv_heads
        return SequenceKV(cfg.num_hidden_layers, heads, cfg.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        """Next-token logits [M, vocab] in fp32 for the tokens at step.logits_indices (on every rank)."""
        x = self.embedding(step.token_ids)
        cos, sin = cos_sin(step.positions, self.inv_freq, self.concentration, self.dtype)
        for block in self.block:
            x = block(x, cos, sin, step)
        x = rms_norm(x[step.logits_indices], self.norm.scale, self.cfg.rms_norm_eps)
        return self.unembedding(x)

    # ------------------------------------------------------------------------------- weights
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
            tensor.copy_(reader.read(name, slices))
        return self

    def randomize(self, seed: int = 0) -> "GptOss":
        """Random weights drawn on the model's device (the `checkpoint=dummy` load for benchmarks).

        Each full tensor is drawn, then cut to this rank's slice, so every layout holds the same model.
        """
        specs = tensor_specs(self.cfg)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, tensor, slices in self.shards():
            tensor.copy_(take(random_tensor(specs[name], generator, self.device), slices))
        return self
