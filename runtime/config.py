"""The model's shape: one dataclass, built from a preset or from a checkpoint's config.json.

Both public config.json dialects are understood: the OpenAI original one (the 16 fields of
gpt_oss.torch.model.ModelConfig) and the Hugging Face one (num_local_experts, rope_scaling, ...).
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path


class ConfigError(ValueError):
    """A config that cannot describe a GPT-OSS model; the message names the field."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = 201088
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5

    @property
    def max_position_embeddings(self) -> int:
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def q_width(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def qkv_width(self) -> int:
        return self.q_width + 2 * self.kv_width

    def is_sliding(self, layer: int) -> bool:
        # Even layers are banded (sliding window), odd layers attend to the whole prefix.
        return layer % 2 == 0

    def layers(self, sliding: bool) -> list[int]:
        """The layers of one kind: the sliding-window ones, or the full-attention ones."""
        return [n for n in range(self.num_hidden_layers) if self.is_sliding(n) == sliding]

    @property
    def kv_pools(self) -> int:
        """KV page pools the layers use: the full layers' pool, and the sliding layers' where there are
        any (runtime/model.py make_pool)."""
        return 1 + bool(self.layers(sliding=True))

    def validate(self) -> "ModelConfig":
        positive = [f.name for f in dataclasses.fields(self) if f.name != "rope_ntk_alpha"]
        for name in positive:
            if not getattr(self, name) > 0:
                raise ConfigError(f"config field {name!r} must be positive, got {getattr(self, name)!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.experts_per_token > self.num_experts:
            raise ConfigError(
                f"experts_per_token ({self.experts_per_token}) exceeds num_experts ({self.num_experts})"
            )
        for name in ("hidden_size", "intermediate_size"):
            if getattr(self, name) % 32:
                raise ConfigError(f"{name} ({getattr(self, name)}) must be a multiple of 32 "
                                  f"(MXFP4 block size)")
        if self.head_dim % 2:
            raise ConfigError(f"head_dim ({self.head_dim}) must be even for RoPE")
        return self

    def to_original_json(self) -> dict:
        """The OpenAI original config.json (exactly REF-T's ModelConfig fields)."""
        d = dataclasses.asdict(self)
        d.pop("rms_norm_eps")  # not a field of the original layout; 1e-5 is hard-coded there
        return d

    def to_hf_json(self) -> dict:
        """The Hugging Face config.json, as shipped with openai/gpt-oss-*."""
        n = self.num_hidden_layers
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": n,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": self.max_position_embeddings,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": False,
            },
            "rms_norm_eps": self.rms_norm_eps,
            "layer_types": ["sliding_attention" if self.is_sliding(i) else "full_attention"
                            for i in range(n)],
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "initializer_range": 0.02,
            "use_cache": True,
            "eos_token_id": 200002,
            "pad_token_id": 199999,
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn",
                    "model.layers.*.mlp.router",
                    "model.embed_tokens",
                    "lm_head",
                ],
            },
        }


CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"


def preset_names() -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / "model").glob("*.yaml"))


def preset(name: str) -> ModelConfig:
    """A model preset from configs/model/<name>.yaml (the yaml files are the only copy of the shapes)."""
    path = CONFIG_DIR / "model" / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown model preset {name!r}; known: {', '.join(preset_names())}")
    from omegaconf import OmegaConf

    return from_mapping(OmegaConf.to_container(OmegaConf.load(path)), str(path))


def from_mapping(fields: dict, source: str) -> ModelConfig:
    """A ModelConfig from our own field names (a hydra `model` node); extra keys such as `name` are
    ignored."""
    return from_json_dict({k: v for k, v in fields.items() if k in ModelConfig.__dataclass_fields__}, source)


# Hugging Face key -> our field, for the keys whose names differ.
_HF_RENAMES = {"num_local_experts": "num_experts", "num_experts_per_tok": "experts_per_token"}
_INT_FIELDS = {f.name for f in dataclasses.fields(ModelConfig) if f.type in ("int", int)}


def _from_hf(raw: dict, source: str) -> dict:
    fields = {}
    for key, value in raw.items():
        key = _HF_RENAMES.get(key, key)
        if key in ModelConfig.__dataclass_fields__:
            fields[key] = value
    rope = raw.get("rope_scaling") or raw.get("rope_parameters") or {}
    if rope:
        rope_type = rope.get("rope_type", rope.get("type"))
        if rope_type not in ("yarn", None):
            raise ConfigError(f"{source}: rope_scaling.rope_type is {rope_type!r}; GPT-OSS uses 'yarn'")
        for hf_key, ours in (
            ("factor", "rope_scaling_factor"),
            ("beta_fast", "rope_ntk_beta"),
            ("beta_slow", "rope_ntk_alpha"),
            ("original_max_position_embeddings", "initial_context_length"),
            ("rope_theta", "rope_theta"),
        ):
            if hf_key in rope:
                fields[ours] = rope[hf_key]
    return fields


def from_json_dict(raw: dict, source: str = "config.json") -> ModelConfig:
    """Build a ModelConfig from either dialect; unknown keys are ignored, missing ones named."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    is_hf = "model_type" in raw or "num_local_experts" in raw or "rope_scaling" in raw
    fields = _from_hf(raw, source) if is_hf else {k: v for k, v in raw.items()
                                                  if k in ModelConfig.__dataclass_fields__}
    required = [f for f in ModelConfig.__dataclass_fields__ if f not in ("rms_norm_eps", "rope_ntk_alpha")]
    missing = [f for f in required if f not in fields]
    # The original layout ships exactly these fields; HF sets the rope fields through rope_scaling.
    if missing:
        raise ConfigError(f"{source}: missing field(s) {', '.join(missing)}")
    for name, value in fields.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{source}: field {name!r} must be a number, got {value!r}")
        if name in _INT_FIELDS:
            if not math.isfinite(float(value)) or float(value) != int(value):
                raise ConfigError(f"{source}: field {name!r} must be an integer, got {value!r}")
            fields[name] = int(value)
        else:
            fields[name] = float(value)
    return ModelConfig(**fields).validate()


def load_config_json(path: str | Path) -> ModelConfig:
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None
    return from_json_dict(raw, str(path))
