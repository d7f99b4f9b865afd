"""Ask one question about one image (Hydra entry point).

    python scripts/chat.py model=llava15_tiny dymu=mid image=eval/data/sample/images/coffee.jpg prompt="What is this?"
    python scripts/chat.py model=llava15 model.name_or_path=DIR dymu=low image=photo.jpg prompt="Describe it." \
        budget.max_visual_tokens=64

Prints the answer and the visual tokens against the unmodified model's count, and saves the merge map as PNG
(`merge_map=...`; never overwrites one without `overwrite=true`). Config: hydra_conf/chat.yaml.
"""

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../hydra_conf", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from llava.chat import chat_from_config

    print(chat_from_config(OmegaConf.to_container(cfg, resolve=True)).report())


if __name__ == "__main__":
    main()
