"""Collect finished evaluation runs into the paper's table layout, as Markdown and CSV (Hydra entry point).

    python scripts/make_table.py                 # every model under outputs/eval
    python scripts/make_table.py model_name=llava15   # one model

Config: hydra_conf/make_table.yaml.
"""

import logging

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../hydra_conf", config_name="make_table", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.tables import write_tables

    md, csv_path = write_tables(cfg.root, cfg.out_dir, model=cfg.model_name, with_paper=cfg.with_paper)
    logging.getLogger(__name__).info("wrote %s and %s\n%s", md, csv_path, md.read_text())


if __name__ == "__main__":
    main()
