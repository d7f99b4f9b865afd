"""Train the testbed's projector (Hydra entry point; config hydra_conf/train_testbed.yaml).

    python scripts/train_testbed.py                       # the shipped projector's recipe
    python scripts/train_testbed.py num_images=200 epochs=1 output_dir=/tmp/try

Writes `output_dir/projector.safetensors` and `train_summary.json`; rerun with the same settings to resume.
"""

import _bootstrap  # noqa: F401 - first: keeps scripts/eval.py from shadowing the `eval` package
import hydra
from omegaconf import DictConfig, OmegaConf


@hydra.main(config_path="../hydra_conf", config_name="train_testbed", version_base="1.3")
def main(cfg: DictConfig) -> None:
    import llava
    from eval.testbed.model import ensure_testbed
    from eval.testbed.train import train

    base = ensure_testbed(cfg.base, projector=cfg.init_projector, adapter=None, image_size=cfg.image_size,
                          feature_layer=cfg.feature_layer)
    pipeline = llava.load_model(base, vtu=False, dtype="float32", attn_implementation="sdpa")
    summary = train(OmegaConf.to_container(cfg, resolve=True), pipeline, cfg.output_dir)
    print(f"trained {summary['steps']} steps, loss {summary['train_loss']:.4f}; "
          f"projector: {cfg.output_dir}/projector.safetensors")


if __name__ == "__main__":
    main()
