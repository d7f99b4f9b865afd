"""LLaVA-1.5 with DyMU on transformers' ``LlavaForConditionalGeneration`` (CLIP ViT-L/14-336 + Llama).

What differs from the shared pipeline (:mod:`llava.pipeline`): one 336x336 crop per image (padded to a square
with the CLIP mean colour, LLaVA-1.5's evaluation setting, or resized and centre-cropped), the patch tokens of
the feature layer (CLS dropped with the ``"default"`` strategy) projected in raster order of each merged
group's first patch, and the vicuna_v1 prompt. Its visual tokens are its encoder tokens, so exact token
bounds are supported.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LlavaForConditionalGeneration

from dymu.budget import VisualBudget
from dymu.patch import vision_token_count

from .images import ImageLike, Video, expand_to_square, load_image
from .pipeline import DyMUPipeline, EncodedImages, order_by_first_position, register_family
from .prompts import SYSTEM_VICUNA_V1, build_prompt, chat_prompt

__all__ = ["DyMULlava"]


@register_family
class DyMULlava(DyMUPipeline):
    """A LLaVA-1.5 model, its processor, and DyMU settings.

    Args:
        model: ``LlavaForConditionalGeneration`` (DToMe / VTU applied or not).
        processor: its ``LlavaProcessor`` (tokenizer + CLIP image processor are used separately).
        vtu: run the LLM with virtual token unmerging (else merged tokens at consecutive positions).
        image_aspect_ratio: ``"pad"`` (LLaVA-1.5 evaluation: pad to square with the mean colour) or
            ``"crop"`` (the image processor's resize + centre crop).
        vtu_cache: ``"merged"`` or ``"expanded"`` KV cache (see :class:`~llava.pipeline.DyMUPipeline`).
        budget: default :class:`~dymu.budget.VisualBudget` of every request (a request may pass its own).

    Raises:
        ValueError: unknown ``image_aspect_ratio`` or ``vtu_cache``; a budget the model cannot meet (e.g. no
            DToMe in the tower).
    """

    display_name = "LLaVA-1.5"
    model_types = ("llava",)
    model_class = LlavaForConditionalGeneration
    supports_token_bounds = True
    options = ("image_aspect_ratio",)

    def __init__(self, model: LlavaForConditionalGeneration, processor, vtu: bool = True,
                 image_aspect_ratio: str = "pad", vtu_cache: str = "merged", budget: VisualBudget | dict | None = None):
        if image_aspect_ratio not in ("pad", "crop"):
            raise ValueError(f"image_aspect_ratio must be 'pad' or 'crop', got {image_aspect_ratio!r}.")
        self.image_aspect_ratio = image_aspect_ratio
        super().__init__(model, processor, vtu=vtu, vtu_cache=vtu_cache, budget=budget)

    def format_prompt(self, question: str, inputs: Sequence[ImageLike | Video]) -> str:
        """The checkpoint's chat template with the vicuna_v1 system sentence, else :func:`~llava.prompts.build_prompt`."""
        templated = chat_prompt(self.processor, question, ["<image>"] * len(inputs), system=SYSTEM_VICUNA_V1,
                                marks=self.placeholders)
        return templated if templated is not None else build_prompt(question, num_images=len(inputs))

    def visual_positions(self, inputs: Sequence[ImageLike | Video]) -> tuple[int, bool]:
        """Exact: every image's full patch grid (576 for CLIP ViT-L/14-336), as :meth:`encode_images` drops the
        CLS token; a lower bound (one per image) for a tower of unknown geometry, checked exactly after encoding."""
        try:
            n0, _ = vision_token_count(self.tower)
        except NotImplementedError:
            return len(inputs), False
        keep_cls = self.model.config.vision_feature_select_strategy == "full"
        return (n0 - (0 if keep_cls else 1)) * len(inputs), True

    def preprocess(self, images: Sequence[ImageLike]) -> torch.Tensor:
        """Images -> ``(N, 3, H, W)`` pixel values as LLaVA-1.5 evaluates (see ``image_aspect_ratio``)."""
        pil = [load_image(img) for img in images]
        if self.image_aspect_ratio == "pad":
            background = tuple(int(round(255 * m)) for m in self.image_processor.image_mean)
            pil = [expand_to_square(img, background) for img in pil]
        return self.image_processor(images=pil, return_tensors="pt")["pixel_values"]

    def crops(self, image: ImageLike) -> torch.Tensor:
        """``(1, 3, 336, 336)``: LLaVA-1.5 sees one crop per image."""
        return self.preprocess([image])

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor, budget: VisualBudget | dict | None = None) -> EncodedImages:
        """Run the vision tower (DToMe if applied) and the projector.

        Args:
            pixel_values: ``(N, 3, H, W)``.
            budget: per-request token budget (default: the pipeline's).

        Returns:
            :class:`~llava.pipeline.EncodedImages` (one host sync for the per-image lengths).

        Raises:
            ValueError: NaN / infinite pixel values; a budget the model cannot meet.
        """
        tokens, group_ids = self.encode_tower(pixel_values, self.request_budget(budget))
        start = 0 if self.model.config.vision_feature_select_strategy == "full" else 1
        lengths = [t.shape[0] - start for t in tokens]
        padded = torch.nn.utils.rnn.pad_sequence([t[start:] for t in tokens], batch_first=True)
        projected = self.model.model.multi_modal_projector(padded)  # (N, max n_i, C_llm)
        features, groups = [], []
        for i, n in enumerate(lengths):
            gid = group_ids[i][start:] - start  # (P,) token of every patch, CLS left out
            order, rank = order_by_first_position(gid, n)  # raster order of each group's first patch
            features.append(projected[i, :n][order])
            groups.append(rank[gid])
        return EncodedImages(features=features, group_index=groups)

    def encode_prompt_images(self, images: Sequence[Sequence[ImageLike]],
                             budget: VisualBudget | dict | None = None) -> EncodedImages:
        """Encode the images of a batch of prompts (per prompt, its images), flattened in prompt order.

        Raises:
            TypeError: a :class:`~llava.images.Video` (LLaVA-1.5 takes images only).
        """
        for s, imgs in enumerate(images):
            self._check_visual_inputs(s, imgs)
        flat = [img for imgs in images for img in imgs]
        return self.encode_images(self.preprocess(flat), budget) if flat else EncodedImages([], [])
