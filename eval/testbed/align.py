"""Aligning the testbed's projector to the LLM's word embeddings, patch by patch, before the language-model stage.

Why: with the projector trained from its random initialisation by the answers' loss alone (LLaVA-1.5's first
stage), an hour of CPU training (about 1,200 images) teaches the LLM each question type's answer prior and leaves
the image inert (docs/testbed.md, Status: v0-v4). The generator knows which shape every patch shows
(:func:`eval.testbed.data.patch_labels`), so the projector can first be taught, by regression on cached tower
features, to emit for each patch the sum of the word embeddings of what it shows, ``e(" red") + e(" circle") +
e(" left")`` (colour, kind, and the side of the image the shape's centre is on), or ``e(" background")``. The
LLM then receives visual tokens that already sit among its own word embeddings, and a LoRA trained on top learns
to read them (tested on the oracle grids of the ground-truth labels first: docs/testbed.md).

This is a training recipe only: the model stays a plain LLaVA-style MLP projector that reads the unmodified
tower's features; nothing at inference uses the labels.
"""

from __future__ import annotations

import logging
import math

import torch

from . import data as tdata

__all__ = ["word_table", "patch_targets", "tower_features", "align_projector"]

logger = logging.getLogger(__name__)

BACKGROUND_WORD = "background"
SIDES = ("left", "right")


def _word_vector(tokenizer, embeddings: torch.Tensor, word: str) -> torch.Tensor:
    ids = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise ValueError(f"{word!r} (with its leading space) is {len(ids)} tokens for this tokenizer, not one; "
                         "the alignment targets need one embedding row per word")
    return embeddings[ids[0]]


def word_table(tokenizer, embeddings: torch.Tensor) -> dict[str, torch.Tensor]:
    """The embedding row of every word a target uses (colours, kinds, sides, ``background``), each spelt with its
    leading space (as inside a sentence).

    Args:
        tokenizer: the LLM's tokenizer.
        embeddings: ``(vocab, C)``, the LLM's input embedding matrix.

    Returns:
        ``{word: (C,) tensor}`` (detached).

    Raises:
        ValueError: a word is not a single token.
    """
    words = (*tdata.COLOURS, *tdata.SHAPES, *SIDES, BACKGROUND_WORD)
    return {w: _word_vector(tokenizer, embeddings, w).detach() for w in words}


def patch_targets(scene: tdata.Scene, table: dict[str, torch.Tensor], patch_size: int) -> torch.Tensor:
    """The alignment target of every patch of ``scene``: ``(patches, C)`` in raster order.

    A patch labelled with a shape (:func:`eval.testbed.data.patch_labels`) gets ``table[colour] + table[kind] +
    table[side]`` (side: ``left`` when the shape's centre is left of the vertical midline, as the position
    questions answer it); every other patch ``table["background"]``.
    """
    labels = torch.from_numpy(tdata.patch_labels(scene, patch_size))
    out = table[BACKGROUND_WORD].expand(len(labels), -1).clone()
    for index, shape in enumerate(scene.shapes, start=1):
        side = SIDES[0] if shape.center[0] < scene.size / 2.0 else SIDES[1]
        out[labels == index] = table[shape.color] + table[shape.kind] + table[side]
    return out


@torch.no_grad()
def tower_features(model, processor, seeds: list[int], image_size: int = 224, progress: bool = True) -> torch.Tensor:
    """The tower hidden states the projector reads, for the generated images ``seeds``.

    Args:
        model: a testbed ``LlavaForConditionalGeneration`` (its ``vision_feature_layer`` and ``"default"``
            strategy: the CLS token dropped, as LLaVA does before the projector).
        processor: its processor (the image preprocessing of evaluation).
        seeds: image seeds (:func:`eval.testbed.data.make_scene`).

    Returns:
        ``(len(seeds), patches, D)`` float16 (half the memory; the regression runs in float32).
    """
    from tqdm.auto import tqdm

    layer = model.config.vision_feature_layer
    tower = model.model.vision_tower
    out = []
    for seed in tqdm(seeds, desc="tower features", disable=not progress):
        image = tdata.render(tdata.make_scene(seed, image_size))
        pixels = processor.image_processor(images=[image], return_tensors="pt")["pixel_values"]
        hidden = tower(pixels.to(tower.dtype), output_hidden_states=True).hidden_states[layer]
        out.append(hidden[0, 1:].half())
    return torch.stack(out)


def _nearest_word_accuracy(pred: torch.Tensor, target: torch.Tensor, is_object: torch.Tensor) -> dict[str, float]:
    """How often a patch's output is nearer its own target than any other target seen (object / background)."""
    uniq = torch.unique(target, dim=0)
    hit = torch.cdist(pred, uniq).argmin(1) == torch.cdist(target, uniq).argmin(1)
    return {"object_patches": float(hit[is_object].float().mean()),
            "background_patches": float(hit[~is_object].float().mean())}


def align_projector(model, processor, *, num_images: int, epochs: int, learning_rate: float = 1e-3,
                    object_weight: float = 5.0, val_images: int = 100, seed: int = 0, image_size: int = 224,
                    batch_patches: int = 4096, progress: bool = True) -> dict:
    """Regress ``model``'s projector, in place, onto :func:`patch_targets` of the training images.

    Weighted MSE (summed over the C channels, averaged over patches; an object patch counts ``object_weight``
    times, as only about a tenth of the patches show a shape), AdamW with a cosine schedule, over the tower
    features of train images ``0 .. num_images - 1`` (computed once); the tower and the LLM are not touched.

    Args:
        model: a testbed ``LlavaForConditionalGeneration`` (unpatched).
        processor: its processor.
        num_images: training images; epochs: passes over their patches.
        val_images: validation-split images for the reported accuracy (0: none).

    Returns:
        ``{"train_mse": ..., "val": {"object_patches": ..., "background_patches": ...}}``: the last epoch's
        training loss and, on the validation images, how often a patch's output is nearest to its own target.

    Raises:
        ValueError: for ``num_images`` or ``epochs`` below 1.
    """
    from tqdm.auto import tqdm

    if num_images < 1 or epochs < 1:
        raise ValueError(f"num_images and epochs must be >= 1, got {num_images} and {epochs}")
    patch_size = model.config.vision_config.patch_size
    table = word_table(processor.tokenizer, model.get_input_embeddings().weight)

    def split_data(split: str, count: int):
        seeds = [tdata.SPLITS[split] + i for i in range(count)]
        feats = tower_features(model, processor, seeds, image_size, progress)
        scenes = [tdata.make_scene(s, image_size) for s in seeds]
        targets = torch.stack([patch_targets(sc, table, patch_size) for sc in scenes])
        targets = targets.flatten(0, 1)
        objects = ~(targets == table[BACKGROUND_WORD]).all(-1)  # a shape's target is never the background row
        return feats.flatten(0, 1), targets, objects

    x, y, objects = split_data("train", num_images)
    weight = 1.0 + (object_weight - 1.0) * objects.float()
    projector = model.model.multi_modal_projector
    for p in projector.parameters():
        p.requires_grad = True
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(projector.parameters(), lr=learning_rate, weight_decay=0.0)
    steps_per_epoch = -(-len(x) // batch_patches)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, epochs * steps_per_epoch)
    train_mse = float("nan")
    for _ in tqdm(range(epochs), desc="aligning the projector", disable=not progress):
        order = torch.randperm(len(x), generator=generator)
        total = 0.0
        for start in range(0, len(x), batch_patches):
            rows = order[start:start + batch_patches]
            pred = projector(x[rows].float())
            loss = (((pred - y[rows]) ** 2).sum(-1) * weight[rows]).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            total += loss.item() * len(rows)
        train_mse = total / len(x)
    if not math.isfinite(train_mse):
        raise RuntimeError(f"the projector alignment diverged (training MSE {train_mse}); lower learning_rate")
    result = {"train_mse": round(train_mse, 4)}
    if val_images:
        xv, yv, ov = split_data("val", val_images)
        with torch.no_grad():
            pred = projector(xv.float())
        result["val"] = {k: round(v, 4) for k, v in _nearest_word_accuracy(pred, yv, ov).items()}
    logger.info("projector aligned: %s", result)
    return result
