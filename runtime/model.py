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
from torch.nn.functional import linear

from runtime.checkpoint import CheckpointReader, random_tensor, tensor_specs
from runtime.config import ModelConfig
from runtime.kernels.attention import attention
from runtime.kernels.moe import experts, route
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


def _buffers(module: nn.Module, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        module.register_buffer(name, t)


class _Holder(nn.Module):
    """A named group of tensors (a norm's scale, a linear's weight and bias, packed MXFP4 blocks/scales)."""

    def __init__(self, **tensors: torch.Tensor):
        super().__init__()
        _buffers(self, **tensors)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, empty):
        super().__init__()
        self.cfg, self.layer = cfg, layer
        p = f"block.{layer}.attn."
        self.norm = _Holder(scale=empty(p + "norm.scale", torch.float32))
        self.qkv = _Holder(weight=empty(p + "qkv.weight"), bias=empty(p + "qkv.bias"))
        self.sinks = nn.Buffer(empty(p + "sinks", torch.float32))
        self.out = _Holder(weight=empty(p + "out.weight"), bias=empty(p + "out.bias"))
        self.window = cfg.sliding_window if cfg.is_sliding(layer) else None
        self.sm_scale = 1.0 / math.sqrt(cfg.head_dim)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, step: Step) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.norm.scale, cfg.rms_norm_eps)
        qkv = linear(h, self.qkv.weight, self.qkv.bias)
        q, k, v = qkv.split([cfg.q_width, cfg.kv_width, cfg.kv_width], dim=-1)
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
        o = torch.cat(outputs).flatten(-2)
        return x + linear(o, self.out.weight, self.out.bias)


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, empty):
        super().__init__()
        self.cfg = cfg
        p = f"block.{layer}.mlp."
        self.norm = _Holder(scale=empty(p + "norm.scale", torch.float32))
        self.gate = _Holder(weight=empty(p + "gate.weight"), bias=empty(p + "gate.bias"))
        self.mlp1_weight = _Holder(blocks=empty(p + "mlp1_weight.blocks"), scales=empty(p + "mlp1_weight.scales"))
        self.mlp1_bias = nn.Buffer(empty(p + "mlp1_bias"))
        self.mlp2_weight = _Holder(blocks=empty(p + "mlp2_weight.blocks"), scales=empty(p + "mlp2_weight.scales"))
        self.mlp2_bias = nn.Buffer(empty(p + "mlp2_bias"))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        h = rms_norm(x, self.norm.scale, cfg.rms_norm_eps)
        expert_ids, weights = route(linear(h, self.gate.weight, self.gate.bias), cfg.experts_per_token)
        y = experts(h, expert_ids, weights, self.mlp1_weight.blocks, self.mlp1_weight.scales, self.mlp1_bias,
                    self.mlp2_weight.blocks, self.mlp2_weight.scales, self.mlp2_bias, cfg.swiglu_limit)
        return x + y


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int, empty):
        super().__init__()
        self.attn = Attention(cfg, layer, empty)
        self.mlp = MoE(cfg, layer, empty)

    def forward(self, x, cos, sin, step):
        return self.mlp(self.attn(x, cos, sin, step))


class GptOss(nn.Module):
    def __init__(self, cfg: ModelConfig, dtype: torch.dtype = torch.bfloat16, device: torch.device | str = "cpu"):
        super().__init__()
        self.cfg, self.dtype = cfg, dtype
        specs = tensor_specs(cfg)

        def empty(name: str, float_dtype: torch.dtype = dtype) -> torch.Tensor:
            spec = specs[name]
            return torch.empty(spec.shape, dtype=torch.uint8 if spec.kind == "uint8" else float_dtype, device=device)

        self.embedding = _Holder(weight=empty("embedding.weight"))
        self.block = nn.ModuleList(Block(cfg, n, empty) for n in range(cfg.num_hidden_layers))
        self.norm = _Holder(scale=empty("norm.scale", torch.float32))
        self.unembedding = _Holder(weight=empty("unembedding.weight"))
        self.inv_freq, self.concentration = yarn_frequencies(
            cfg.head_dim, cfg.rope_theta, cfg.rope_scaling_factor, cfg.initial_context_length,
            cfg.rope_ntk_alpha, cfg.rope_ntk_beta)

    @property
    def device(self) -> torch.device:
        return self.embedding.weight.device

    def new_cache(self) -> SequenceKV:
        cfg = self.cfg
        return SequenceKV(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, self.dtype, self.device)

    @torch.inference_mode()
    def forward(self, step: Step) -> torch.Tensor:
        """Next-token logits [M, vocab] in fp32 for the tokens at step.logits_indices."""
        x = self.embedding.weight[step.token_ids]
        cos, sin = cos_sin(step.positions, self.inv_freq, self.concentration, self.dtype)
        for block in self.block:
            x = block(x, cos, sin, step)
        x = rms_norm(x[step.logits_indices], self.norm.scale, self.cfg.rms_norm_eps)
        return linear(x, self.unembedding.weight).float()

    # ------------------------------------------------------------------------------- weights
    def load(self, reader: CheckpointReader) -> "GptOss":
        """Copy every tensor from a checkpoint (validated first, so a bad one fails before any copy)."""
        reader.validate()
        for name, tensor in self.state_dict().items():
            tensor.copy_(reader.read(name))
        return self

    def randomize(self, seed: int = 0) -> "GptOss":
        """Random weights drawn on the model's device (the `checkpoint=dummy` load for benchmarks)."""
        specs = tensor_specs(self.cfg)
        generator = torch.Generator(device=self.device).manual_seed(seed)
        for name, tensor in self.state_dict().items():
            tensor.copy_(random_tensor(specs[name], generator, self.device))
        return self
