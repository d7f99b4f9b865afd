"""A tiny, randomly initialised LLaVA-1.5 checkpoint built offline, for tests and demos.

The checkpoint has LLaVA-1.5's architecture and token geometry (CLIP ViT at 336 px with 14 px patches,
i.e. 577 vision tokens = CLS + 24x24, of which the 576 patch tokens reach the language model through a
2-layer GELU projector into a Llama decoder) but tiny widths, a tiny byte-level BPE tokenizer trained
here in code, and **random weights**. It produces gibberish. It exists so that loading, prompting,
merging and generation code can be exercised end to end with the stock ``transformers`` classes
(``LlavaForConditionalGeneration.from_pretrained(..., local_files_only=True)`` and
``AutoProcessor.from_pretrained(...)``) on a machine that cannot reach the Hugging Face Hub.

Typical use::

    from eval.tiny import ensure_tiny_llava15

    path = ensure_tiny_llava15(tmp_dir / "tiny-llava-1.5")   # builds once, then reuses
    model = LlavaForConditionalGeneration.from_pretrained(path, local_files_only=True)
    processor = AutoProcessor.from_pretrained(path, local_files_only=True)
"""

from __future__ import annotations

import json
import logging
import os
import random
import shutil
import uuid
from pathlib import Path

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from dymu import find_thresholds
from llava import load_model

__all__ = [
    "IMAGE_TOKEN",
    "MARKER_FILE",
    "LLAVA15_CHAT_TEMPLATE",
    "ONEVISION_CHAT_TEMPLATE",
    "TOKENIZER_VOCAB_SIZE",
    "build_tiny_tokenizer",
    "build_tiny_llava15",
    "ensure_tiny_llava15",
    "build_tiny_llava_onevision",
    "ensure_tiny_llava_onevision",
    "ensure_tiny_thresholds",
    "calibrate_embedded",
    "TESTBED_TARGETS",
    "ensure_testbed_model",
    "ensure_testbed_thresholds",
    "ensure_embedded",
    "EMBEDDED",
    "export_calibration_images",
]

logger = logging.getLogger(__name__)

IMAGE_TOKEN = "<image>"
"""The image placeholder; a special token, so it always encodes to exactly one id."""

MARKER_FILE = "dymu_tiny.json"
"""Name of the marker written next to the weights, saying they are random."""

LLAVA15_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}"
    "{% for c in message['content'] %}{{ c['text'] }}{% endfor %}{{ ' ' }}"
    "{% else %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}{{ ' ' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
"""The tiny LLaVA-1.5's chat template (Jinja, written here): the vicuna_v1 format, i.e. the system text, then
``USER: `` with one ``<image>`` and a newline per image item before the question, then ``ASSISTANT:`` (tests
check it renders exactly what :func:`llava.prompts.build_prompt` writes)."""

ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}{{ '<image>\n' }}{% elif c['type'] == 'video' %}{{ '<video>\n' }}{% endif %}"
    "{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
"""The tiny LLaVA-OneVision's chat template (Jinja, written here): Qwen2's chat format, visual items (each
followed by a newline) before the text (tests check it renders exactly what
:func:`llava.prompts.build_onevision_prompt` writes)."""

TOKENIZER_VOCAB_SIZE = 1000
"""Target size of the trained BPE vocabulary (specials and the 256 byte symbols included)."""

# Order fixes the ids: <unk>=0, <s>=1, </s>=2, <pad>=3, <image>=4 (Llama also has <unk>, <s>, </s> = 0, 1, 2).
_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN)

# OpenAI CLIP's published normalisation constants (the ones LLaVA-1.5's image processor uses).
_CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
_CLIP_STD = [0.26862954, 0.26130258, 0.27577711]

_SYSTEM_PROMPT = (
    "A chat between a curious human and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the human's questions."
)

# A small built-in English corpus: LLaVA-1.5 prompt pieces and the vocabulary of short VQA answers.
_SENTENCES = (
    _SYSTEM_PROMPT,
    "USER: What is shown in this image? ASSISTANT: A cat is sitting on a wooden table.",
    "USER: Describe the image in detail. ASSISTANT: The picture shows a dog playing in the park.",
    "Answer the question using a single word or phrase.",
    "Answer with the option's letter from the given choices directly.",
    "Please answer yes or no.",
    "Is there a person in the photo? Yes, there is a man wearing a red shirt.",
    "How many birds are on the fence? There are three birds.",
    "What color is the car? The car is blue.",
    "Where is the boy standing? He is standing next to the window.",
    "Which animal is bigger, the horse or the mouse? The horse.",
    "Who is holding the umbrella? A woman in a black coat.",
    "Why is the street wet? Because it was raining.",
    "When was this photo taken? It was taken at night.",
    "Can you read the text on the sign? It says stop.",
    "Does the girl have a hat? No, she does not.",
    "Are the lights on? Yes, they are.",
    "The rocket is launching into the sky above the clouds.",
    "An astronaut in a white suit stands in front of a flag.",
    "A cup of coffee sits on a plate next to a spoon.",
    "The clock on the wall shows ten o'clock.",
    "A small orange cat with green eyes looks at the camera.",
    "There is a bowl of fruit with apples, bananas and oranges on the kitchen table.",
    "Two children are riding bicycles down the road near the river.",
    "The old man reads a newspaper while sitting on a bench.",
    "I think the answer is four, but it could also be five.",
    "Please describe the scene, count the objects and name their colors.",
)

_WORD_LISTS = (
    # question words and short answers
    "what which who whom whose where when why how is are was were do does did can could would should "
    "will has have had many much there this that these those it its the a an of in on at to from with "
    "by for about above below under over behind between near inside outside left right top bottom "
    "front back middle yes no maybe true false correct wrong none all some both each other",
    # colours
    "red orange yellow green blue purple pink brown black white gray grey silver gold beige navy "
    "maroon teal dark light bright colorful",
    # animals
    "cat cats dog dogs bird birds horse horses cow cows sheep pig pigs elephant elephants giraffe zebra "
    "bear bears lion tiger monkey mouse rabbit duck chicken fish whale dolphin snake frog insect butterfly "
    "kitten puppy animal animals",
    # objects and scenes
    "person people man men woman women boy girl child children baby player car cars bus truck train "
    "plane airplane boat bicycle motorcycle street road sign traffic light building house room kitchen "
    "table chair bed couch sofa window door wall floor ceiling tree trees grass flower flowers sky cloud "
    "water beach ocean river mountain snow field park city food pizza cake sandwich banana apple orange "
    "bowl plate cup glass bottle knife fork spoon phone laptop computer keyboard screen television book "
    "clock vase umbrella bag backpack hat shirt jacket shoes ball kite frisbee skateboard surfboard "
    "tennis racket camera picture photo image rocket astronaut moon coins coffee brick gravel text page",
    # verbs and adjectives
    "sitting standing walking running eating drinking playing holding wearing riding flying looking "
    "lying sleeping smiling reading writing cooking swimming jumping big small large little tall short "
    "long old young new happy sad open closed empty full wet dry hot cold round square wooden metal "
    "plastic soft hard clean dirty sunny cloudy rainy indoors outdoors day night morning evening",
    # digits and numbers
    "0 1 2 3 4 5 6 7 8 9 10 11 12 20 25 50 100 2024 zero one two three four five six seven eight nine "
    "ten eleven twelve first second third several few dozen number count",
)


def _corpus() -> list[str]:
    """The training corpus as a list of lines (fixed order, so training is deterministic)."""
    lines = list(_SENTENCES)
    for words in _WORD_LISTS:
        split = words.split()
        lines.append(" ".join(split))
        lines.append(" ".join(w.capitalize() for w in split))
        lines.extend(f"USER: <image>\nIs this a {w}? ASSISTANT: Yes, it is a {w}." for w in split[:40])
    return lines


def build_tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Train a tiny byte-level BPE tokenizer in code, deterministically, on a built-in English corpus.

    The tokenizer is for offline tests and demos only (it goes with the random-weight tiny LLaVA of
    :func:`build_tiny_llava15`). Properties:

    - about :data:`TOKENIZER_VOCAB_SIZE` entries, ids 0-4 are ``<unk>``, ``<s>`` (bos), ``</s>`` (eos),
      ``<pad>`` and ``<image>``; all five are special tokens, so ``<image>`` is always one token;
    - a byte-level pre-tokenizer and decoder, so any text (any Unicode) round-trips;
    - like Llama's tokenizer, ``<s>`` is prepended when ``add_special_tokens=True``.

    Returns:
        A ``transformers.PreTrainedTokenizerFast`` (``TokenizersBackend`` in transformers 5) with
        ``bos_token``, ``eos_token``, ``unk_token`` and ``pad_token`` set.
    """
    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=TOKENIZER_VOCAB_SIZE,
        min_frequency=1,
        special_tokens=list(_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    # Specials are in the vocab already; registering them again marks them as special added tokens,
    # which are split off before pre-tokenization ("<image>" never merges with its neighbours).
    tokenizer.add_special_tokens(list(_SPECIAL_TOKENS))
    bos_id = tokenizer.token_to_id("<s>")
    tokenizer.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(
                single="<s> $A",
                pair="<s> $A <s> $B",
                special_tokens=[("<s>", bos_id)],
            ),
        ]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=2048,
    )


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def llava15_config(tokenizer: PreTrainedTokenizerFast, vision: dict | None = None, text: dict | None = None) -> LlavaConfig:
    """LLaVA-1.5 config with the tiny model's widths, or other shapes via overrides.

    Token geometry is LLaVA-1.5's whatever the widths (336 px, 14 px patches, features from the
    second-to-last layer without CLS). ``vision`` / ``text`` override ``CLIPVisionConfig`` / ``LlamaConfig``
    fields (e.g. the 7B widths in :mod:`eval.shapes`); the text vocab defaults to the tokenizer's size
    rounded up to 64.

    Raises:
        ValueError: the tokenizer's image token id lies outside the text vocab.
    """
    vision_config = CLIPVisionConfig(**{
        **dict(image_size=336, patch_size=14, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
               num_attention_heads=4, projection_dim=64, hidden_act="quick_gelu", layer_norm_eps=1e-5),
        **(vision or {}),
    })
    text_config = LlamaConfig(**{
        **dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=_round_up(len(tokenizer), 64), max_position_embeddings=2048,
               rms_norm_eps=1e-5, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False, initializer_range=0.02),
        **(text or {}),
    })
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=576,
    )
    if not 0 <= config.image_token_id < config.text_config.vocab_size:
        raise ValueError(
            f"image token id {config.image_token_id} is outside the text vocab "
            f"(size {config.text_config.vocab_size}); fix the tokenizer's special tokens"
        )
    return config


def llava15_processor(tokenizer: PreTrainedTokenizerFast) -> LlavaProcessor:
    """LLaVA-1.5's processor (CLIP preprocessing at 336 px) around ``tokenizer``."""
    # transformers 5's `CLIPImageProcessor` is the torchvision backend and, without torchvision, falls
    # back to `CLIPImageProcessorPil` with a warning; use the PIL class directly (torchvision must not
    # be installed on CPU-only machines, see docs/environment.md).
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": 336},
        crop_size={"height": 336, "width": 336},
        do_center_crop=True,
        image_mean=_CLIP_MEAN,
        image_std=_CLIP_STD,
        do_convert_rgb=True,
    )
    return LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=14,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
        chat_template=LLAVA15_CHAT_TEMPLATE,
    )


def _write_marker(path: Path, name: str, builder: str, seed: int, **extra) -> None:
    """The :data:`MARKER_FILE` of an embedded random-weight checkpoint (what it is, how it was built)."""
    marker = {
        "name": f"{name} (DyMU test checkpoint)",
        "random_weights": True,
        "seed": seed,
        "note": "Randomly initialised weights for offline tests and demos only; not a trained model.",
        "builder": f"{__name__}.{builder}",
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__.split("+")[0],
        **extra,
    }
    (path / MARKER_FILE).write_text(json.dumps(marker, indent=2, allow_nan=False) + "\n", encoding="utf-8")


def build_tiny_llava15(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny LLaVA-1.5-shaped checkpoint with **random weights** and save it to ``path``.

    For offline tests and demos only: the weights are random (drawn after ``torch.manual_seed(seed)``),
    the model's outputs are meaningless. It keeps LLaVA-1.5's geometry: a CLIP ViT at 336 px with
    14 px patches (577 tokens = CLS + 24x24, 8 layers, width 64), features from the second-to-last
    layer with CLS dropped (576 image tokens per image), a GELU MLP projector, and a 2-layer Llama
    decoder (width 128, GQA 4 query / 2 key-value heads). The same seed gives identical weights. The
    caller's global torch RNG state is restored afterwards.

    Writes, with ``save_pretrained``: config + float32 safetensors weights + generation config, the
    processor (``LlavaProcessor`` with a ``CLIPImageProcessorPil`` and the tokenizer of
    :func:`build_tiny_tokenizer`), and the marker file :data:`MARKER_FILE` recording the seed and that
    the weights are random.

    Args:
        path: output directory (created if missing; existing files are overwritten).
        seed: seed for the random weights.

    Returns:
        ``path`` as a ``pathlib.Path``.
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tiny_tokenizer()
    config = llava15_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(path)
    llava15_processor(tokenizer).save_pretrained(path)
    _write_marker(path, "tiny-llava-1.5", "build_tiny_llava15", seed,
                  text_vocab_size=config.text_config.vocab_size, tokenizer_size=len(tokenizer),
                  image_token_id=config.image_token_id, image_seq_length=config.image_seq_length)
    logger.info(
        "built tiny LLaVA-1.5 (random weights, seed=%d, %.2fM parameters) in %s",
        seed,
        sum(p.numel() for p in model.parameters()) / 1e6,
        path,
    )
    return path


def ensure_tiny_llava15(path: str | os.PathLike, seed: int = 0, builder=None) -> Path:
    """Return ``path`` holding the tiny random-weight LLaVA-1.5, building it on first use.

    For offline tests and demos only (the weights are random, see :func:`build_tiny_llava15`).
    Builds only if ``path/config.json`` is missing. The checkpoint is written to a temporary sibling
    directory and renamed into place, so an interrupted build never leaves a half-written checkpoint
    at ``path``; if another process finishes first, its checkpoint is kept.

    Args:
        path: checkpoint directory. If it exists it must contain ``config.json`` or be empty.
        seed: seed for the random weights when building (ignored if the checkpoint exists).
        builder: the build function (default :func:`build_tiny_llava15`; see :func:`ensure_tiny_llava_onevision`).

    Returns:
        ``path`` as a ``pathlib.Path``.

    Raises:
        FileExistsError: ``path`` exists, is not empty and has no ``config.json``.
    """
    path = Path(path)
    if (path / "config.json").is_file():
        logger.info("tiny LLaVA-1.5 already present in %s; reusing it", path)
        return path
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise FileExistsError(
            f"{path} exists but holds no config.json; it is not a tiny LLaVA checkpoint. "
            "Remove it or pass another path."
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    logger.info("tiny LLaVA-1.5 missing in %s; building it (random weights, seed=%d)", path, seed)
    # A unique sibling (same filesystem, so the rename is atomic); mkdir honours the umask, unlike
    # tempfile.mkdtemp's 0700, which would become the checkpoint directory's mode.
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        (builder or build_tiny_llava15)(tmp, seed=seed)
        try:
            # Replaces `path` if it is an empty directory; fails if someone else filled it meanwhile.
            os.replace(tmp, path)
        except OSError:
            if not (path / "config.json").is_file():
                raise
            logger.info("another process built %s first; discarding this build", path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


# ----------------------------------------------------------------------------------- thresholds
CALIBRATION_IMAGES = (
    "brick", "grass", "gravel", "checkerboard", "clock", "logo", "immunohistochemistry", "retina",
    "microaneurysms", "shepp_logan_phantom", "cell", "stereo_motorcycle",
)
"""``skimage.data`` photos (inside the wheel, none used by the ``sample`` benchmark) for calibration."""

TINY_TARGETS = {"low": 94, "mid": 209, "high": 393}
"""Tokens per image at the feature layer (CLS included), as LLaVA-1.5's r = 21 / 16 / 8 over 23 layers."""

ONEVISION_TARGETS = {"low": 102, "mid": 182, "high": 343}
"""Tokens per 729-token crop at the feature layer: about 14 / 25 / 47 % of the tokens, the fractions the paper
reports for its LLaVA-OneVision low / mid / high variants."""


def export_calibration_images(folder: str | os.PathLike, crops_per_image: int = 4, seed: int = 0) -> list[Path]:
    """Write :data:`CALIBRATION_IMAGES` and ``crops_per_image`` seeded random crops of each as JPEG files.

    Returns:
        The written paths (60 by default), sorted.
    """
    import numpy as np
    import skimage.data
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = []
    for name in CALIBRATION_IMAGES:
        array = getattr(skimage.data, name)()
        array = array[0] if isinstance(array, tuple) else array
        image = Image.fromarray(np.asarray(array)).convert("RGB")
        views = [image]
        for _ in range(crops_per_image):
            w, h = image.size
            cw, ch = int(w * rng.uniform(0.3, 0.8)), int(h * rng.uniform(0.3, 0.8))
            x0, y0 = int(rng.integers(0, w - cw + 1)), int(rng.integers(0, h - ch + 1))
            views.append(image.crop((x0, y0, x0 + cw, y0 + ch)))
        for i, view in enumerate(views):
            path = folder / f"{name}_{i}.jpg"
            view.save(path, quality=90)
            paths.append(path)
    return sorted(paths)


# -------------------------------------------------------------------------------- LLaVA-OneVision
ONEVISION_SPECIAL_TOKENS = ("<image>", "<video>", "<|im_start|>", "<|im_end|>")


def onevision_tokenizer() -> PreTrainedTokenizerFast:
    """:func:`build_tiny_tokenizer` plus the LLaVA-OneVision special tokens."""
    tokenizer = build_tiny_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": list(ONEVISION_SPECIAL_TOKENS)})
    tokenizer.chat_template = ONEVISION_CHAT_TEMPLATE
    return tokenizer


def onevision_config(tokenizer: PreTrainedTokenizerFast, vision: dict | None = None, text: dict | None = None):
    """LLaVA-OneVision config with the tiny widths, or other shapes via ``SiglipVisionConfig`` / ``Qwen2Config``
    overrides; upstream grid pinpoints, ``anyres_max_9`` and token geometry (384 px, 14 px patches)."""
    from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

    reference = LlavaOnevisionConfig()  # upstream defaults: grid pinpoints, anyres_max_9, token geometry
    return LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**{
            **dict(image_size=384, patch_size=14, hidden_size=64, intermediate_size=256, num_hidden_layers=8,
                   num_attention_heads=4, vision_use_head=False, layer_norm_eps=1e-6),
            **(vision or {}),
        }),
        text_config=Qwen2Config(**{
            **dict(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=_round_up(len(tokenizer), 64), max_position_embeddings=32768,
                   rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
                   bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id),
            **(text or {}),
        }),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        video_token_id=tokenizer.convert_tokens_to_ids("<video>"),
        vision_feature_layer=-1,
        vision_feature_select_strategy="full",
        vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=reference.image_grid_pinpoints,
    )


def onevision_image_processor():
    """LLaVA-OneVision's AnyRes image processor (PIL backend; upstream grid pinpoints, 384 px crops)."""
    from transformers import LlavaOnevisionConfig
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
        LlavaOnevisionImageProcessorPil,
    )

    return LlavaOnevisionImageProcessorPil(
        size={"height": 384, "width": 384}, image_grid_pinpoints=LlavaOnevisionConfig().image_grid_pinpoints,
        do_pad=True, image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def build_tiny_llava_onevision(path: str | os.PathLike, seed: int = 0) -> Path:
    """Build a tiny LLaVA-OneVision-shaped checkpoint with **random weights** and save it to ``path``.

    For offline tests and demos only. Keeps LLaVA-OneVision's token geometry: SigLIP at 384 px with 14 px
    patches (729 tokens per crop, no CLS), AnyRes with the OneVision grid pinpoints (384 to 2304 px) and
    ``anyres_max_9``, features from the last tower layer, a learned ``image_newline``, a Qwen2 decoder
    (q/k/v biases, GQA). Widths are tiny (vision 64, 8 layers; text 128, 2 layers). Eight tower layers
    make the "low" budget (about 14 % of 729 tokens) feasible at at most half the tokens per layer.

    Writes the model, the tokenizer (:func:`build_tiny_tokenizer` plus the OneVision special tokens) and the
    PIL image processor separately (LLaVA-OneVision's combined processor needs a torchvision video
    processor), and the :data:`MARKER_FILE`.
    """
    from transformers import LlavaOnevisionForConditionalGeneration

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = onevision_tokenizer()
    config = onevision_config(tokenizer)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaOnevisionForConditionalGeneration(config).to(torch.float32).eval()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    onevision_image_processor().save_pretrained(path)
    _write_marker(path, "tiny-llava-onevision", "build_tiny_llava_onevision", seed)
    logger.info("built tiny LLaVA-OneVision (random weights, seed=%d) in %s", seed, path)
    return path


def ensure_tiny_llava_onevision(path: str | os.PathLike, seed: int = 0) -> Path:
    """Return ``path`` holding the tiny random-weight LLaVA-OneVision, building it on first use
    (atomically, as :func:`ensure_tiny_llava15`)."""
    return ensure_tiny_llava15(path, seed=seed, builder=build_tiny_llava_onevision)


def ensure_tiny_thresholds(path: str | os.PathLike, targets: dict[str, int] | None = None) -> dict[str, Path]:
    """Calibrate the tiny model's DToMe thresholds on first use (``path/thresholds/<variant>.json``).

    Runs :func:`dymu.find_thresholds` on :func:`export_calibration_images` (see :func:`calibrate_embedded`), in
    batches of 16 images (LLaVA-1.5) or 4 (LLaVA-OneVision, several crops each). Existing files are kept.

    Args:
        path: the tiny checkpoint (see :func:`ensure_tiny_llava15` / :func:`ensure_tiny_llava_onevision`).
        targets: variant -> tokens per image (crop) at the feature layer (default :data:`TINY_TARGETS`, or
            :data:`ONEVISION_TARGETS` for a OneVision checkpoint).

    Returns:
        variant -> thresholds file.
    """
    path = Path(path)
    onevision = json.loads((path / "config.json").read_text())["model_type"] == "llava_onevision"
    if targets is None:
        targets = ONEVISION_TARGETS if onevision else TINY_TARGETS
    return calibrate_embedded(path, lambda: export_calibration_images(path / "calibration_images"), targets,
                              per_batch=4 if onevision else 16, source="eval.tiny.ensure_tiny_thresholds")


def calibrate_embedded(path: Path, images, targets: dict[str, int], per_batch: int, source: str) -> dict[str, Path]:
    """Calibrate an embedded checkpoint's thresholds for the variants whose ``path/thresholds/<variant>.json`` is
    missing (existing files are kept).

    Each image is preprocessed as the pipeline deploys it (:meth:`~llava.pipeline.DyMUPipeline.crops`), batched
    ``per_batch`` images at a time in an order shuffled with seed 0, as ``scripts/find_thresholds.py`` batches them
    for its default seed, so the values equal that driver's; the realised token count is measured on the same
    batches.

    Args:
        path: the checkpoint folder.
        images: a callable returning the calibration image paths (called only when a variant is missing).
        targets: variant -> tokens per image (crop) at the feature layer, CLS included.
        per_batch: images per calibration batch.
        source: recorded as the thresholds' ``source`` (with the variant).

    Returns:
        variant -> thresholds file.
    """
    files = {v: path / "thresholds" / f"{v}.json" for v in targets}
    todo = {v: t for v, t in targets.items() if not files[v].is_file()}
    if todo:
        images = images()
        pipe = load_model(path, dymu=None, vtu=False, dtype=torch.float32, local_files_only=True)
        order = list(range(len(images)))
        random.Random(0).shuffle(order)  # diverse batches, in the calibration driver's order for its default seed 0
        crops = [pipe.crops(images[i]) for i in order]  # (n_crops, 3, H, W) each
        batches = [torch.cat(crops[i : i + per_batch]) for i in range(0, len(crops), per_batch)]
        config = pipe.model.config
        for variant, target in todo.items():
            logger.info("calibrating thresholds '%s' of %s (target %d tokens) on %d images", variant, path.name,
                        target, len(images))
            thresholds = find_thresholds(
                pipe.tower, batches, target_tokens=target, feature_layer=config.vision_feature_layer,
                realised_batches=batches, progress=False, source=f"{source} ({variant})",
                extra={"model": str(path.name), "batch_size": per_batch, "images": len(images)},
            )
            thresholds.save(files[variant])
    return files


# ---------------------------------------------------------------------------------- real-weights testbed
TESTBED_TARGETS = {"low": 42, "mid": 93, "high": 175}
"""Tokens per 257-token image (CLS included) at the testbed tower's feature layer: LLaVA-1.5's 94 / 209 / 393 of 577
scaled to 257 (16 / 36 / 68 % of the tokens, the paper's low / mid / high fractions)."""

TESTBED_CALIBRATION_IMAGES = 256
"""Training-split images of :mod:`eval.testbed.data` the testbed's thresholds are calibrated on."""


def ensure_testbed_model(path: str | os.PathLike) -> Path:
    """The testbed checkpoint (trained projector) at ``path``, built from the installed weight packages on first
    use (:func:`eval.testbed.model.ensure_testbed`)."""
    from .testbed.model import ensure_testbed

    return ensure_testbed(path)


def ensure_testbed_thresholds(path: str | os.PathLike, targets: dict[str, int] | None = None) -> dict[str, Path]:
    """Calibrate the testbed's thresholds on first use, on the first :data:`TESTBED_CALIBRATION_IMAGES` training
    images (written to ``path/calibration_images``), 16 per batch (:func:`calibrate_embedded`).

    Args:
        path: the testbed checkpoint.
        targets: variant -> tokens per image (default :data:`TESTBED_TARGETS`).
    """
    from .testbed import data as tdata

    path = Path(path)

    def images() -> list[Path]:
        folder = tdata.write_split(path / "calibration_images", "train", TESTBED_CALIBRATION_IMAGES).parent
        return sorted((folder / "images").glob("*.png"))

    return calibrate_embedded(path, images, dict(targets or TESTBED_TARGETS), per_batch=16,
                              source="eval.tiny.ensure_testbed_thresholds")


EMBEDDED = {"tiny_llava15": ensure_tiny_llava15, "tiny_llava_onevision": ensure_tiny_llava_onevision,
            "testbed": ensure_testbed_model}
"""``model.build`` config value -> the function that builds that embedded checkpoint on first use."""

_EMBEDDED_THRESHOLDS = {"testbed": ensure_testbed_thresholds}
"""``model.build`` -> its thresholds function, where it is not :func:`ensure_tiny_thresholds`."""


def ensure_embedded(model_cfg, thresholds: bool = True) -> Path:
    """Build the embedded model a model config names (``model.build``, at ``model.name_or_path``) on first use
    and, unless ``thresholds=False``, its thresholds (:func:`ensure_tiny_thresholds`; the testbed's:
    :func:`ensure_testbed_thresholds`).

    Returns:
        the checkpoint folder.

    Raises:
        ValueError: unknown ``model.build`` (the message lists :data:`EMBEDDED`).
    """
    build = model_cfg.get("build")
    if build not in EMBEDDED:
        raise ValueError(f"unknown model.build {build!r}; use one of {tuple(EMBEDDED)} or null.")
    path = EMBEDDED[build](str(model_cfg["name_or_path"]))
    if thresholds:
        _EMBEDDED_THRESHOLDS.get(build, ensure_tiny_thresholds)(path)
    return path
