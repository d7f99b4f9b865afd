"""Evaluate a LLaVA model with or without DyMU on a benchmark (Hydra entry point).

    python scripts/eval.py model=llava15 dymu=mid benchmark=sample
    python scripts/eval.py model=llava15_tiny dymu=mid benchmark=sample      # offline, embedded tiny model
    python scripts/eval.py -m model=llava15_tiny dymu=off,low,mid,high,tome_94   # several variants
    python scripts/eval.py model=llava15_tiny dymu=mid budget.max_visual_tokens=64  # per-image token budget

Writes predictions.jsonl and metrics.json under output_dir (re-running resumes), logs to wandb (offline by
default; wandb.mode=disabled turns it off). Exits 1 when every sample failed (after writing the records); a run
with some failures ends with a summary and metrics.json "status": "incomplete". Config: hydra_conf/eval.yaml.
"""

import _bootstrap  # noqa: F401 - first: keeps this file from shadowing the `eval` package
import logging
import sys

import eval  # noqa: F401 - registers the config resolvers hydra_conf/eval.yaml uses
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../hydra_conf", config_name="eval", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.main import evaluate
    from eval.runner import RunFailedError

    try:
        evaluate(cfg)
    except RunFailedError as err:  # records and metrics.json are written; there is no result: exit non-zero
        logging.getLogger("eval").error("run FAILED: %s", err)
        sys.exit(1)


if __name__ == "__main__":
    main()
