"""Collect finished evaluation runs into the paper's table layout, as Markdown and CSV (Hydra entry point).

    python scripts/make_table.py                 # every model under outputs/eval
    python scripts/make_table.py model_name=llava15   # one model
    python scripts/make_table.py overwrite=true       # replace the tables of an earlier call

Config: hydra_conf/make_table.yaml.
"""

import logging

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import eval  # noqa: F401 - registers the config schema (eval/config.py)
import hydra
from omegaconf import DictConfig


@hydra.main(config_path="../hydra_conf", config_name="make_table", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from pathlib import Path

    from eval.tables import write_tables

    stem = "results" if cfg.model_name is None else f"results_{cfg.model_name}"  # as write_tables names them
    existing = [str(p) for p in (Path(cfg.out_dir) / f"{stem}.md", Path(cfg.out_dir) / f"{stem}.csv") if p.exists()]
    if existing and not cfg.overwrite:
        raise FileExistsError(f"refusing to overwrite {' and '.join(existing)}; pass overwrite=true to replace "
                              "them, or out_dir=<another folder>.")
    md, csv_path = write_tables(cfg.root, cfg.out_dir, model=cfg.model_name, with_paper=cfg.with_paper)
    logging.getLogger(__name__).info("wrote %s and %s\n%s", md, csv_path, md.read_text())


if __name__ == "__main__":
    main()
