"""Calibrate DToMe thresholds for a model (Hydra entry point).

    python scripts/find_thresholds.py model=llava15 variant=mid data.images=/data/llava/llava_v1_5_mix665k.json \
        data.image_root=/data/llava/images
    torchrun --nproc_per_node=2 scripts/find_thresholds.py model=llava15_tiny variant=low   # data-parallel

Writes the thresholds JSON to `output` (default: the model config's file for the variant). Config:
hydra_conf/find_thresholds.yaml.
"""

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../hydra_conf", config_name="find_thresholds", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.calibrate import calibrate_from_config

    calibrate_from_config(cfg)


if __name__ == "__main__":
    main()
