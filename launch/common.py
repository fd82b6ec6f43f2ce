"""What every entry point shares: the engine from a hydra config, and clean start-up failures."""

from __future__ import annotations

import sys
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf

from runtime.config import ConfigError, from_mapping
from runtime.engine import LLM


def build_llm(cfg: DictConfig) -> LLM:
    checkpoint = cfg.checkpoint
    model = from_mapping(OmegaConf.to_container(cfg.model), f"model preset {cfg.model.get('name')}")
    return LLM(
        None if checkpoint is None else str(checkpoint),
        model=model,
        dtype=cfg.dtype,
        device=cfg.device,
        max_model_len=cfg.max_model_len,
        max_batch_size=cfg.max_batch_size,
        max_batch_tokens=cfg.max_batch_tokens,
        default_max_tokens=cfg.default_max_tokens,
        seed=cfg.seed,
    )


@contextmanager
def clean_exit():
    """Start-up problems (a missing file, a bad checkpoint or config) end the job with one clear line."""
    try:
        yield
    except (ConfigError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
