"""Write a synthetic (random) checkpoint of any preset in either public layout.

    python -m launch.make_checkpoint model=tiny layout=original out=DIR [seed=0]
    python -m launch.make_checkpoint model=gpt-oss-20b layout=hf out=DIR   # 13 GB, the real shapes
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from launch.common import clean_exit
from runtime.checkpoint import write_checkpoint
from runtime.config import from_mapping


@hydra.main(version_base=None, config_path="../configs", config_name="make_checkpoint")
def main(cfg: DictConfig) -> None:
    with clean_exit():
        model = from_mapping(OmegaConf.to_container(cfg.model), f"model preset {cfg.model.get('name')}")
        path = write_checkpoint(model, cfg.out, layout=cfg.layout, seed=cfg.seed)
    print(f"wrote a random {cfg.model.name} checkpoint ({cfg.layout} layout, seed {cfg.seed}) to {path}")


if __name__ == "__main__":
    main()
