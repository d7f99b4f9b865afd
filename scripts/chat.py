"""Ask one question about one image (Hydra entry point).

    python scripts/chat.py model=llava15_tiny dymu=mid image=eval/data/sample/images/coffee.jpg prompt="What is this?"
    python scripts/chat.py model=llava15 model.name_or_path=DIR dymu=low image=photo.jpg prompt="Describe it." \
        budget.max_visual_tokens=64

Prints the answer and the visual tokens against the unmodified model's count, and saves the merge map as PNG
(`merge_map=...`; never overwrites one without `overwrite=true`). Without `image=` or `prompt=` it exits 2 with
a message naming the missing one. Config: hydra_conf/chat.yaml.
"""

import sys

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../hydra_conf", config_name="chat", version_base="1.3")
def main(cfg: DictConfig) -> None:
    from eval.chat import ChatArgumentError, chat_from_config

    try:
        result = chat_from_config(OmegaConf.to_container(cfg, resolve=True))
    except ChatArgumentError as err:  # a usage error: the message, not a traceback
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    print(result.report())


if __name__ == "__main__":
    main()
