"""The engine's settings: one dataclass, each default written once, each check made on construction.

configs/engine.yaml mirrors these fields key for key (hydra reads the yaml; tests/test_config.py
holds the two equal), and launch/common.py turns a hydra config into an EngineConfig with
`from_mapping`. The model's shape is not here: `model` names a preset (or is a ModelConfig), and
a checkpoint's own config.json wins over it.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any, Mapping

import torch

from runtime.config import ModelConfig, from_mapping as model_from_mapping, preset, preset_names
from runtime.kv_cache import KV_CACHE_DTYPES

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return _is_int(value) or isinstance(value, float)


def _check_at_least_one(name: str, value) -> None:
    """A count setting (ranks, sequences, tokens) is an integer of at least 1; `name` is the setting
    as the user types it (parallel.tp), so the error points at the override to fix."""
    if not _is_int(value):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < 1:
        raise ValueError(f"{name} must be at least 1, got {value}")


def _typed_name(model: str | ModelConfig) -> str:
    """`model` as the user typed it (from_mapping has turned a hydra preset into its ModelConfig)."""
    if isinstance(model, str):
        return model
    return next((name for name in preset_names() if preset(name) == model), "<a custom ModelConfig>")


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """The layout of a job's ranks: world = dp x tp x ep (parallel/groups.py builds the groups)."""
    tp: int = 1  # attention heads (and vocabulary) split over tp ranks
    ep: int = 1  # experts partitioned over ep groups of tp ranks
    dp: int | None = None  # independent replicas; None: world / (tp x ep)
    expert_tp: int | None = None  # ways each expert is split; None: tp
    attention_dp: bool = False  # each of a replica's ranks attends over its own requests (tp=1, ep=N)
    timeout_s: float = 600  # a collective waiting longer than this fails the job instead of hanging

    def __post_init__(self):
        # Checked here, before launch/common.py divides the world size by tp x ep.
        _check_at_least_one("parallel.tp", self.tp)
        _check_at_least_one("parallel.ep", self.ep)
        for name in ("dp", "expert_tp"):  # None: derived from the world size and tp
            if getattr(self, name) is not None:
                _check_at_least_one(f"parallel.{name}", getattr(self, name))
        if not isinstance(self.attention_dp, bool):
            raise ValueError(f"parallel.attention_dp must be true or false, got {self.attention_dp!r}")
        if not (_is_number(self.timeout_s) and 0 < self.timeout_s < math.inf):
            raise ValueError(f"parallel.timeout_s must be a positive number of seconds, "
                             f"got {self.timeout_s!r}")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """What runtime.engine.LLM is built from.

    checkpoint: a folder (either public layout), "dummy" (random weights of `model`), or None (the
    embedded tiny synthetic checkpoint, so `model` must be tiny). max_model_len None: the model's
    limit. kv_cache_tokens None: on CUDA what gpu_memory_fraction of the GPU leaves after the
    weights, on CPU a pool that grows on demand. enforce_eager: never replay steps from CUDA graphs.
    mixed_graph_tokens: mixed steps (prompt chunks beside decodes) of up to this many tokens replay
    CUDA graphs of the forward between their attentions (runtime/mixed_graphs.py; 0: eager).
    enable_prefix_caching: reuse the KV pages of prompt prefixes computed before (vLLM's name;
    runtime/prefix_cache.py). schedule_conservativeness: how much of the running sequences'
    growth a fixed KV cache keeps room for when admitting (SGLang's name; runtime/scheduler.py; 0:
    admit while the prompt fits, preempting when the batch outgrows the cache). seed: dummy weights;
    and a request without a seed samples with runtime.sampling.default_seed(seed, its id).
    count_expert_load: count the rows each expert gets in each layer (`LLM.expert_load`; one more
    small launch a layer, so only the throughput benchmark turns it on). kv_cache_dtype: "auto" (the
    model's dtype) or "fp8" / "fp8_e4m3" (float8 e4m3, scale 1: half the KV bytes, runtime/kv_cache.py).
    """
    checkpoint: str | Path | None = None
    model: str | ModelConfig = "tiny"
    dtype: str = "auto"
    device: str = "auto"
    max_model_len: int | None = None
    max_batch_size: int = 1024  # keeps a big file's batch full (docs/performance.md, "Offline throughput")
    max_batch_tokens: int = 8192
    default_max_tokens: int = 256
    kv_cache_tokens: int | None = None
    kv_cache_dtype: str = "auto"
    gpu_memory_fraction: float = 0.9
    enforce_eager: bool = False
    # 2048: 1.155x at max_batch_tokens 2048, inert at the defaults (docs/performance.md, session 20)
    mixed_graph_tokens: int = 2048
    enable_prefix_caching: bool = True
    schedule_conservativeness: float = 0.0
    seed: int = 0
    count_expert_load: bool = False
    parallel: ParallelConfig = dataclasses.field(default_factory=ParallelConfig)

    def __post_init__(self):
        for name in ("max_batch_size", "max_batch_tokens", "default_max_tokens"):
            _check_at_least_one(name, getattr(self, name))
        if self.max_model_len is not None:
            _check_at_least_one("max_model_len", self.max_model_len)
        if self.max_batch_tokens < self.max_batch_size:
            raise ValueError(f"max_batch_tokens ({self.max_batch_tokens}) must be at least max_batch_size "
                             f"({self.max_batch_size}): every running sequence decodes one token per step")
        if not _is_int(self.mixed_graph_tokens) or self.mixed_graph_tokens < 0:
            raise ValueError(f"mixed_graph_tokens must be an integer of at least 0 (0: mixed steps run "
                             f"eagerly), got {self.mixed_graph_tokens!r}")
        if self.kv_cache_tokens is not None and self.kv_cache_tokens < 1:
            raise ValueError(f"kv_cache_tokens must be positive, got {self.kv_cache_tokens}")
        conservativeness = self.schedule_conservativeness
        if not (_is_number(conservativeness) and 0 <= conservativeness < math.inf):
            raise ValueError(f"schedule_conservativeness must be a number of at least 0, "
                             f"got {self.schedule_conservativeness!r}")
        if not 0 < self.gpu_memory_fraction <= 1:
            raise ValueError(f"gpu_memory_fraction must be in (0, 1], got {self.gpu_memory_fraction}")
        if self.kv_cache_dtype not in KV_CACHE_DTYPES:
            raise ValueError(f"kv_cache_dtype={self.kv_cache_dtype!r} is not supported; use one of "
                             f"{', '.join(KV_CACHE_DTYPES)}")
        if self.dtype != "auto" and self.dtype not in DTYPES:
            raise ValueError(f"dtype={self.dtype!r} is not supported; use one of auto, {', '.join(DTYPES)}")
        if self.checkpoint is None and self.model_config != preset("tiny"):
            raise ValueError(f"model={_typed_name(self.model)} was given without a checkpoint: pass "
                             f"checkpoint=DIR for its weights, or checkpoint=dummy for random weights of its "
                             f"shape; without a checkpoint only the embedded tiny model runs")

    @property
    def model_config(self) -> ModelConfig:
        """The shape `model` names (a checkpoint's config.json wins over it)."""
        return preset(self.model) if isinstance(self.model, str) else self.model

    @classmethod
    def from_mapping(cls, settings: Mapping[str, Any]) -> "EngineConfig":
        """From a plain mapping such as a hydra config's container: keys that are not engine settings
        (input, output, ...) are ignored, missing ones take the defaults. A `model` node (a preset's
        fields and its `name`) becomes a ModelConfig, a `parallel` node a ParallelConfig."""
        fields = {f.name: settings[f.name] for f in dataclasses.fields(cls) if f.name in settings}
        model = fields.get("model")
        if isinstance(model, Mapping):
            fields["model"] = model_from_mapping(dict(model), f"model preset {model.get('name')}")
        if isinstance(fields.get("parallel"), Mapping):
            fields["parallel"] = ParallelConfig(**fields["parallel"])
        if fields.get("checkpoint") is not None:
            fields["checkpoint"] = str(fields["checkpoint"])
        return cls(**fields)
