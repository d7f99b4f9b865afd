"""Speed and memory of DyMU vs the unmodified model, measured side by side in one process (Hydra entry point).

    python scripts/benchmark.py                                   # LLaVA-1.5-7B shapes, bf16, 4 LLM layers, CPU
    python scripts/benchmark.py shape=llava15_7b llm_layers=null device=cuda   # the whole 7B on a GPU
    python scripts/benchmark.py shape=llava_ov_7b images=[astronaut,coffee]

Random weights at real shapes (eval/shapes.py); thresholds calibrated on the same model with the
find_thresholds code. Writes results.json, results.md and results.png to `output_dir`. Config:
hydra_conf/speed.yaml; what is measured: eval/speed.py.
"""

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import eval  # noqa: F401 - registers the config schema (eval/config.py)
import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../hydra_conf", config_name="speed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from eval.speed import run_from_config

    run_from_config(OmegaConf.to_container(cfg, resolve=True))
    print((Path(cfg.output_dir) / "results.md").read_text())


if __name__ == "__main__":
    main()
