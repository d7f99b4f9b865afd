"""The shared DyMU pipeline over a transformers VLM: check prompts, encode, splice, pad, lay out VTU, generate.

The stock processor expands each visual placeholder to a fixed token count and the stock model asserts
features == placeholders; DyMU's count is known only after encoding. So a pipeline encodes the visual inputs
first (DToMe in the vision tower), then builds the merged input sequence itself: embeddings, a 2-D attention
mask, position ids and the VTU group map over the virtual (unmerged) layout, and calls the model /
``generate`` with ``inputs_embeds``. Nothing of upstream LLaVA is vendored.

What differs between model families lives in one module per family (``llava/llava15.py``,
``llava/onevision.py``), a subclass of :class:`DyMUPipeline` that implements the **family interface**:

- class attributes: ``display_name``, ``model_types`` (the ``config.model_type`` values it serves),
  ``model_class`` (the transformers class :func:`llava.load_model` loads), ``placeholders``,
  ``supports_video``, ``supports_token_bounds``, ``options`` (its own constructor keywords);
- ``load_processor(name_or_path, **kwargs)`` (classmethod; default ``AutoProcessor``);
- :meth:`~DyMUPipeline.format_prompt`, :meth:`~DyMUPipeline.visual_positions`, :meth:`~DyMUPipeline.crops`,
  :meth:`~DyMUPipeline.encode_prompt_images`.

It registers itself with :func:`register_family`. The pipeline here never names a family; its messages name
the registered ones. It does assume a LLaVA-shaped transformers model: ``model.model.vision_tower`` and
``model.model.multi_modal_projector``, ``config.vision_feature_layer`` / ``vision_feature_select_strategy``,
``config.image_token_id`` (and ``video_token_id``), ``config.text_config.max_position_embeddings``, and an
LLM that takes ``inputs_embeds`` with ``position_ids`` (VTU: a RoPE decoder :func:`dymu.apply_vtu` patches).

Shapes: B prompts, L_m merged length, L virtual length, C LLM width, V_i virtual positions of input i, n_i its
merged tokens.
"""

from __future__ import annotations

import abc
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from PIL import Image
from transformers import AutoProcessor

from dymu import vis
from dymu.budget import VisualBudget, check_budget, encode_under_budget
from dymu.patch import is_patched, vision_token_count
from dymu.vtu import VTUInputs

from .images import ImageLike, Video, describe_inputs
from .prompts import check_text, require_question

__all__ = ["DyMUPipeline", "EncodedImages", "LlavaInputs", "register_family", "family_for", "FAMILIES",
           "first_positions", "order_by_first_position"]

logger = logging.getLogger(__name__)

FAMILIES: dict[str, type["DyMUPipeline"]] = {}
"""``config.model_type`` -> the family's pipeline class (filled by :func:`register_family`)."""


def register_family(cls: type["DyMUPipeline"]) -> type["DyMUPipeline"]:
    """Class decorator: make ``cls`` the pipeline :func:`llava.load_model` builds for its ``model_types``.

    Raises:
        ValueError: a model type another family already serves.
        TypeError: ``cls`` is no :class:`DyMUPipeline`, or lacks ``display_name``, ``model_types`` or ``model_class``.
    """
    if not (isinstance(cls, type) and issubclass(cls, DyMUPipeline)):
        raise TypeError(f"register_family takes a DyMUPipeline subclass, got {cls!r}.")
    missing = [name for name in ("display_name", "model_types", "model_class") if not getattr(cls, name)]
    if missing:
        raise TypeError(f"{cls.__name__} must set {', '.join(missing)} (see the family interface in "
                        "docs/architecture.md).")
    for model_type in cls.model_types:
        if FAMILIES.get(model_type, cls) is not cls:
            raise ValueError(f"model type {model_type!r} is served by {FAMILIES[model_type].__name__} already.")
        FAMILIES[model_type] = cls
    return cls


def _families_with(feature: str) -> str:
    """The display names of the registered families that have ``feature`` (a class attribute), for messages."""
    names = [f.display_name for f in dict.fromkeys(FAMILIES.values()) if getattr(f, feature)]
    return " / ".join(names) or "no registered family"


def family_for(model_type: str) -> type["DyMUPipeline"]:
    """The pipeline class for a checkpoint's ``config.model_type``.

    Raises:
        NotImplementedError: no family serves it (the message lists the supported model types).
    """
    if model_type not in FAMILIES:
        raise NotImplementedError(f"no DyMU model family serves model_type {model_type!r}; supported: "
                                  f"{sorted(FAMILIES)}. Adding one means one family module (see docs/architecture.md).")
    return FAMILIES[model_type]


def first_positions(group_index: torch.Tensor, num_groups: int, positions: torch.Tensor | None = None,
                    empty: int | None = None) -> torch.Tensor:
    """The first (smallest) position of every group.

    Args:
        group_index: ``(..., V)`` long, the group in ``[0, num_groups)`` of every position.
        num_groups: ``n``.
        positions: ``(..., V)`` long, the position of each entry (default: its index ``0..V-1``).
        empty: value for groups without a position (default ``V``, or the largest long with ``positions``).

    Returns:
        ``(..., n)`` long.
    """
    if empty is None:
        empty = group_index.shape[-1] if positions is None else torch.iinfo(torch.long).max
    if positions is None:
        positions = torch.arange(group_index.shape[-1], device=group_index.device).expand_as(group_index)
    first = torch.full((*group_index.shape[:-1], num_groups), empty, dtype=torch.long, device=group_index.device)
    return first.scatter_reduce_(-1, group_index, positions, reduce="amin")


def order_by_first_position(group_index: torch.Tensor, num_groups: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Order ``n`` merged tokens by the first virtual position they cover.

    Args:
        group_index: ``(V,)`` long, the token in ``[0, n)`` of every virtual position.
        num_groups: ``n``.

    Returns:
        ``(order, rank)``, both ``(n,)`` long: ``tokens[order]`` lists the tokens in first-position order, and
        ``rank[group_index]`` is the virtual group map over them. First positions are unique, so the order is
        fully determined.
    """
    order = first_positions(group_index, num_groups, empty=group_index.numel()).argsort()
    rank = torch.empty_like(order)
    rank[order] = torch.arange(order.numel(), device=order.device)
    return order, rank


@dataclass
class EncodedImages:
    """Merged visual tokens of a list of visual inputs, ready for the LLM.

    Attributes:
        features: per input ``(n_i, C_llm)`` merged tokens as fed to the LLM, in order of the first virtual
            position each covers (LLaVA-1.5: projected merged patches in raster order of their first patch).
        group_index: per input ``(V_i,)`` long, the merged token in ``[0, n_i)`` of every position of the
            input's virtual (unmodified-model) layout (LLaVA-1.5: the 576 patches in raster order, CLS
            dropped with the "default" strategy).
    """

    features: list[torch.Tensor]
    group_index: list[torch.Tensor]

    @property
    def num_tokens(self) -> list[int]:
        """Visual tokens per input fed to the LLM."""
        return [f.shape[0] for f in self.features]


@dataclass
class LlavaInputs:
    """A left-padded batch of merged prompts.

    Attributes:
        inputs_embeds: ``(B, L_m, C)``.
        attention_mask: ``(B, L_m)`` long.
        position_ids: ``(B, L_m)`` long. With VTU: the virtual position of each merged token's first
            member (so ``generate`` continues after the last virtual position); without VTU: consecutive.
        vtu: the virtual layout (``None`` when VTU is off).
        visual_tokens: per sample, visual tokens fed to the LLM (all its inputs).
        unmerged_visual_tokens: per sample, the visual tokens the unmodified model would get (the length of
            its inputs' virtual layout: 576 per LLaVA-1.5 image).
    """

    inputs_embeds: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    vtu: VTUInputs | None
    visual_tokens: list[int]
    unmerged_visual_tokens: list[int] | None = None

    def model_kwargs(self) -> dict:
        """Keyword arguments for ``model(...)`` / ``model.generate(...)``."""
        kwargs = dict(inputs_embeds=self.inputs_embeds, attention_mask=self.attention_mask, position_ids=self.position_ids)
        if self.vtu is not None:
            kwargs["vtu"] = self.vtu
        return kwargs


class DyMUPipeline(abc.ABC):
    """A transformers VLM, its processor and DyMU settings: the part every model family shares.

    Build one with :func:`llava.load_model`, or a family's class directly (``DyMULlava``,
    ``DyMULlavaOnevision``) on a loaded model.

    Args:
        model: the family's transformers model (DToMe / VTU applied or not).
        processor: its processor, or any object with ``.tokenizer`` and ``.image_processor``.
        vtu: run the LLM with virtual token unmerging (else merged tokens at consecutive positions).
        vtu_cache: KV cache layout of VTU generation, ``"merged"`` (scales with the merged length) or
            ``"expanded"`` (full length); see :class:`~dymu.vtu.VTUInputs`.
        budget: default :class:`~dymu.budget.VisualBudget` of every request (a request may pass its own).

    Raises:
        ValueError: unknown ``vtu_cache``; a default budget the model cannot meet (e.g. no DToMe in the tower).
        NotImplementedError: a ``vision_feature_select_strategy`` other than ``"default"`` / ``"full"``; token
            bounds for a family without them.
    """

    # ------------------------------------------------------------ family interface: class attributes
    display_name: ClassVar[str] = ""
    """The family's name in messages, e.g. ``"LLaVA-1.5"``."""
    model_types: ClassVar[tuple[str, ...]] = ()
    """``config.model_type`` values the family serves (e.g. ``("llava",)``)."""
    model_class: ClassVar[type | None] = None
    """The transformers class :func:`llava.load_model` loads the checkpoint with."""
    placeholders: ClassVar[tuple[str, ...]] = ("<image>",)
    """Texts the tokenizer reads as a visual input's slot."""
    supports_video: ClassVar[bool] = False
    """Whether :class:`~llava.images.Video` inputs are taken."""
    supports_token_bounds: ClassVar[bool] = False
    """Whether ``max_visual_tokens`` / ``min_visual_tokens`` are exact (the LLM's visual tokens of an input
    are its encoder tokens)."""
    options: ClassVar[tuple[str, ...]] = ()
    """The family's own constructor keywords, which :func:`llava.load_model` passes on."""

    def __init__(self, model, processor, *, vtu: bool = True, vtu_cache: str = "merged",
                 budget: VisualBudget | dict | None = None):
        if vtu_cache not in ("merged", "expanded"):
            raise ValueError(f"vtu_cache must be 'merged' or 'expanded', got {vtu_cache!r}.")
        config = model.config
        if config.vision_feature_select_strategy not in ("default", "full"):
            raise NotImplementedError(f"vision_feature_select_strategy {config.vision_feature_select_strategy!r}")
        self.model = model
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.image_processor = processor.image_processor
        self.vtu = vtu
        self.vtu_cache = vtu_cache
        self.image_token_id = config.image_token_id
        self.video_token_id = getattr(config, "video_token_id", None)
        self.tower = model.model.vision_tower
        self.budget = VisualBudget.coerce(budget)
        if not self.budget.is_default:  # a bad default budget fails here, before any work
            if not all(v is None or isinstance(v, int) for v in (self.budget.max_visual_tokens,
                                                                  self.budget.min_visual_tokens)):
                raise ValueError("a pipeline's default budget takes one int per bound; per-image lists go with "
                                 "each request (generate(..., budget=...)).")
            self.request_budget(self.budget)
            check_budget(self.tower, self.budget, 1, dropped_tokens=self.dropped_tokens)

    @classmethod
    def load_processor(cls, name_or_path, **kwargs):
        """The checkpoint's processor (``AutoProcessor``); a family overrides this if it needs less or more."""
        return AutoProcessor.from_pretrained(name_or_path, **kwargs)

    # ------------------------------------------------------------ family interface: methods
    @abc.abstractmethod
    def format_prompt(self, question: str, inputs: Sequence[ImageLike | Video]) -> str:
        """The chat prompt for one checked question about ``inputs``, ending where the answer starts."""

    @abc.abstractmethod
    def visual_positions(self, inputs: Sequence[ImageLike | Video]) -> tuple[int, bool]:
        """LLM positions of one prompt's (non-empty) visual inputs in the VTU virtual layout, as known before
        encoding: ``(count, exact)``, ``count`` a lower bound when not ``exact``."""

    @abc.abstractmethod
    def crops(self, image: ImageLike) -> torch.Tensor:
        """``(n_crops, 3, H, W)``: what the vision tower sees of one image at deployment (threshold calibration
        and merge maps use it, so they see deployment preprocessing)."""

    @abc.abstractmethod
    def encode_prompt_images(self, images: Sequence[Sequence[ImageLike | Video]],
                             budget: VisualBudget | dict | None = None) -> EncodedImages:
        """Encode the visual inputs of a batch of prompts (per prompt, its inputs), flattened in prompt order,
        under ``budget`` (default: the pipeline's); use :meth:`encode_tower` for the tower."""

    # ------------------------------------------------------------ shared
    @property
    def device(self) -> torch.device:
        """Device of the model's weights."""
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        """Dtype of the model's weights (pixels are cast to it)."""
        return self.model.dtype

    @property
    def max_positions(self) -> int | None:
        """Positions the language model takes (``text_config.max_position_embeddings``, read at each call);
        None when its config has no limit."""
        limit = getattr(self.model.config.text_config, "max_position_embeddings", None)
        return int(limit) if limit is not None else None

    @property
    def dropped_tokens(self) -> int:
        """Encoder tokens per image the LLM does not get: 1 where the host drops the CLS token after the tower
        (``vision_feature_select_strategy="default"`` with a CLS token), else 0."""
        if self.model.config.vision_feature_select_strategy == "full":
            return 0
        return int(vision_token_count(self.tower)[1])

    def request_budget(self, budget: VisualBudget | dict | None = None) -> VisualBudget:
        """A request's budget: ``budget``, or the pipeline's default :attr:`budget` when None.

        Raises:
            ValueError: an invalid budget (see :class:`~dymu.budget.VisualBudget`).
            NotImplementedError: token bounds on a family whose visual tokens are not its encoder tokens.
        """
        budget = self.budget if budget is None else VisualBudget.coerce(budget)
        if budget.has_bounds and not self.supports_token_bounds:
            raise NotImplementedError(
                f"max_visual_tokens / min_visual_tokens are exact for {_families_with('supports_token_bounds')} "
                f"only; with {self.display_name} an input's visual tokens span more than its encoder tokens (crops, "
                "newline tokens, downsampling), so encoder-side bounds would not be exact in LLM tokens. Use "
                "threshold_scale to trade tokens for detail.")
        return budget

    @torch.no_grad()
    def encode_tower(self, pixel_values: torch.Tensor,
                     budget: VisualBudget) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Run the vision tower (DToMe under ``budget`` if applied) on a batch of images, crops or frames.

        Args:
            pixel_values: ``(N, 3, H, W)``.
            budget: the request's budget (see :meth:`request_budget`).

        Returns:
            per image ``(n_i, C_vis)`` feature-layer tokens (CLS included) and ``(N0,)`` group ids.

        Raises:
            ValueError: NaN / infinite pixel values; a budget the tower cannot meet
                (:func:`dymu.budget.encode_under_budget`).
        """
        if not torch.isfinite(pixel_values).all():
            raise ValueError("pixel_values contain NaN or infinite values; check the image preprocessing.")
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if is_patched(self.tower) or not budget.is_default:
            dropped = 0 if budget.is_default else self.dropped_tokens
            out = encode_under_budget(self.tower, pixel_values, budget, dropped_tokens=dropped)
            return out.tokens, out.group_ids
        hidden = self.tower(pixel_values, output_hidden_states=True).hidden_states[
            self.model.config.vision_feature_layer]  # (N, N0, C_vis)
        ids = torch.arange(hidden.shape[1], device=hidden.device)
        return list(hidden), [ids] * hidden.shape[0]

    def _check_positions(self, index: int, text: int, visual: int, inputs: Sequence, max_new_tokens: int,
                         exact: bool = True) -> None:
        """Prompt ``index`` (``text`` tokens, ``visual`` LLM positions of its ``inputs``) plus ``max_new_tokens``
        must fit in :attr:`max_positions`.

        Raises:
            ValueError: it does not; the message gives the numbers and what to reduce.
        """
        limit, total = self.max_positions, text + visual + max_new_tokens
        if limit is None or total <= limit:
            return
        layout = ("visual tokens count in the unmerged layout that VTU's positions run over, so merging does not "
                  "shorten them" if self.vtu else
                  "visual tokens are the merged ones, at consecutive positions (VTU off)")
        raise ValueError(
            f"prompt {index} needs {'' if exact else 'at least '}{total:,} positions but the language model has "
            f"{limit:,} (text_config.max_position_embeddings): {text:,} text tokens + {visual:,} visual tokens for "
            f"{describe_inputs(inputs)} + {max_new_tokens:,} for the answer (max_new_tokens); {layout}. Cut at "
            f"least {total - limit:,}: fewer images or video frames, a shorter prompt, or a smaller max_new_tokens."
        )

    def _positions_before_encoding(self, inputs: Sequence[ImageLike | Video]) -> tuple[int, bool]:
        """:meth:`visual_positions` with VTU; without it the merged count is known only after encoding (at
        least one position per input)."""
        if not self.vtu or not inputs:
            return len(inputs), not inputs
        return self.visual_positions(inputs)

    def _check_visual_inputs(self, index: int, inputs: Sequence) -> None:
        """The model takes every input of prompt ``index``.

        Raises:
            TypeError: a :class:`~llava.images.Video` for a family without video support.
        """
        for i, item in enumerate(inputs):
            if isinstance(item, Video) and not self.supports_video:
                raise TypeError(
                    f"prompt {index}, input {i} is a llava.Video ({item.num_frames} frames), but {type(self).__name__} "
                    f"({self.display_name}) takes images only: use a {_families_with('supports_video')} model for "
                    "video, or pass the frames as images (video.images(), one '<image>' each)."
                )

    def _check_question(self, question: object, inputs: Sequence, index: int | None = None) -> None:
        """A question for :meth:`prompt` (``index``: its place in a :meth:`generate` call).

        Raises:
            TypeError: not a str.
            ValueError: a lone surrogate; placeholders in the question that do not match the inputs one to one.
        """
        name = f"question {index}" if index is not None else "the question"
        check_text(name, question)
        count = sum(question.count(p) for p in self.placeholders)
        if count and count != len(inputs):
            marks = " / ".join(f"'{p}'" for p in self.placeholders)
            raise ValueError(
                f"{name} contains {count} {marks} placeholder{'s' * (count != 1)} but {describe_inputs(inputs)} "
                f"{'was' if len(inputs) == 1 else 'were'} given. A question that contains {marks} places its inputs "
                "itself, one placeholder per input in order (a question without any gets them before it). If the "
                "text is meant literally, it cannot be passed as it is, since the tokenizer reads it as the slot "
                "of an input: write it another way, e.g. '< image >'."
            )

    def prompt(self, question: str, inputs: Sequence[ImageLike | Video] = ("image",)) -> str:
        """The model's chat prompt for one question about ``inputs``: the checkpoint's chat template where it
        ships one, else the family's hand-written format (see :mod:`llava.prompts`).

        Placeholders: a question without any gets one per input before it (``<video>`` for each
        :class:`~llava.images.Video` where the family takes video, else ``<image>``). A question that contains
        placeholders places its inputs itself: it must contain exactly one per input, in input order, each taken
        as that input's slot. So the literal text ``<image>`` cannot be asked about as it is (the tokenizer reads
        it as the image slot): a question holding it with a different number of inputs is refused rather than
        guessed at; write such text another way (e.g. ``< image >``).

        Raises:
            TypeError: ``question`` is not a str.
            ValueError: an empty question, a lone surrogate in it, or placeholders in it that do not match
                ``inputs`` one to one.
        """
        self._check_question(question, inputs)
        require_question(question)
        return self.format_prompt(question, inputs)

    # ------------------------------------------------------------- prompts -> merged inputs
    def build_inputs(self, prompts: Sequence[str], images: Sequence[Sequence[ImageLike | Video]],
                     budget: VisualBudget | dict | None = None, max_new_tokens: int = 0) -> LlavaInputs:
        """Tokenise prompts, encode their visual inputs, and lay out the merged batch (left padding).

        Position limit: each prompt's positions plus ``max_new_tokens`` must fit in the language model's
        :attr:`max_positions` (``text_config.max_position_embeddings``). With VTU the positions are the virtual
        layout: its text tokens plus every visual input's full pre-merge token count (576 per LLaVA-1.5 image),
        however much the encoder merges; without VTU, the merged length. The check runs twice, both times
        before the LLM: before any image is read or encoded, on the length known from the prompt alone (exact
        for LLaVA-1.5 images and LLaVA-OneVision videos and multi-image prompts; a lower bound for a
        single-image AnyRes prompt, whose length depends on the image size), and after encoding, exactly.

        An empty batch (``[]``, ``[]``) gives empty inputs (no prompt, nothing encoded).

        Args:
            prompts: full prompts containing one placeholder per visual input (see :meth:`prompt`).
            images: per prompt, its visual inputs in placeholder order.
            budget: this request's :class:`~dymu.budget.VisualBudget` (per-image lists follow the images in
                prompt order); default: the pipeline's :attr:`budget`.
            max_new_tokens: positions to keep free after each prompt for its answer (:meth:`generate` passes
                its own); 0 for a forward pass.

        Raises:
            TypeError: ``prompts`` is one str rather than a list, a prompt is not a str, or a
                :class:`~llava.images.Video` for a family without video support (LLaVA-1.5).
            ValueError: prompts and image lists differ in length; a prompt holds a lone surrogate; a prompt's
                placeholder count differs from its number of images; a prompt (plus ``max_new_tokens``) is
                longer than the model's position limit; ``max_new_tokens`` is negative or not an int; an invalid
                budget.
            NotImplementedError: token bounds on a family without them.
        """
        if isinstance(prompts, str):
            raise TypeError("prompts must be a list of prompts, one per sample; got a single str: wrap it, "
                            "build_inputs([prompt], [images]).")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}.")
        if len(prompts) != len(images):
            raise ValueError(f"{len(prompts)} prompts but {len(images)} image lists.")
        if not prompts:
            return self._empty_inputs()
        tokenised = []  # placeholders and lengths are checked first: a bad prompt costs no vision compute
        for s, (prompt, imgs) in enumerate(zip(prompts, images)):
            check_text(f"prompt {s}", prompt)
            self._check_visual_inputs(s, imgs)
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"][0].to(self.device)
            is_video = ids == self.video_token_id if self.video_token_id is not None else torch.zeros_like(ids).bool()
            slots = ((ids == self.image_token_id) | is_video).nonzero().flatten().tolist()
            if len(slots) != len(imgs):
                raise ValueError(
                    f"prompt {s} has {len(slots)} '<image>'/'<video>' placeholders but {len(imgs)} images or "
                    "videos were given; put one placeholder per image (or video) in the prompt, e.g. build it "
                    "with pipe.prompt(question, images), which adds them to a question that has none."
                )
            kinds = [bool(is_video[slot]) for slot in slots]
            if kinds != [isinstance(item, Video) for item in imgs]:
                raise ValueError(f"prompt {s}: the order of '<image>' / '<video>' placeholders does not match the "
                                 "inputs (pass llava.Video(frames) for each '<video>').")
            visual, exact = self._positions_before_encoding(imgs)
            self._check_positions(s, len(ids) - len(slots), visual, imgs, max_new_tokens, exact=exact)
            tokenised.append((ids, slots))
        encoded = self.encode_prompt_images(images, budget=self.request_budget(budget))
        embed = self.model.get_input_embeddings()
        merged_embeds, virtual_groups, merged_lengths, visual_tokens, unmerged = [], [], [], [], []
        next_image = 0
        for s, (ids, slots) in enumerate(tokenised):
            pieces, groups, offset, cursor, n_visual, n_unmerged = [], [], 0, 0, 0, 0
            for slot in slots + [len(ids)]:
                text = ids[cursor:slot]
                pieces.append(embed(text))
                groups.append(torch.arange(offset, offset + len(text), device=self.device))
                offset += len(text)
                if slot < len(ids):
                    feats = encoded.features[next_image]
                    pieces.append(feats.to(pieces[-1].dtype))
                    groups.append(encoded.group_index[next_image] + offset)
                    offset += feats.shape[0]
                    n_visual += feats.shape[0]
                    n_unmerged += encoded.group_index[next_image].numel()
                    next_image += 1
                cursor = slot + 1
            n_text = len(ids) - len(slots)  # the exact check, before the LLM: virtual (VTU) or merged positions
            self._check_positions(s, n_text, n_unmerged if self.vtu else n_visual, images[s], max_new_tokens)
            merged_embeds.append(torch.cat(pieces))
            virtual_groups.append(torch.cat(groups))
            merged_lengths.append(offset)
            visual_tokens.append(n_visual)
            unmerged.append(n_unmerged)
        inputs = self._pad(merged_embeds, virtual_groups, merged_lengths, visual_tokens)
        inputs.unmerged_visual_tokens = unmerged
        return inputs

    def _empty_inputs(self) -> LlavaInputs:
        """The inputs of an empty batch: ``(0, 0, C)`` embeddings, ``(0, 0)`` mask and positions, no samples."""
        weight = self.model.get_input_embeddings().weight
        empty = torch.zeros(0, 0, dtype=torch.long, device=self.device)
        return LlavaInputs(weight.new_zeros(0, 0, weight.shape[-1]), empty, empty.clone(), None, [], [])

    def _pad(self, merged_embeds, virtual_groups, merged_lengths, visual_tokens) -> LlavaInputs:
        """Left-pad per-prompt merged embeddings ``(L_m_b, C)`` and virtual group maps ``(L_b,)`` into a batch."""
        bsz, lm, length = len(merged_embeds), max(merged_lengths), max(len(g) for g in virtual_groups)
        width = merged_embeds[0].shape[-1]
        embeds = merged_embeds[0].new_zeros(bsz, lm, width)
        mask = torch.zeros(bsz, lm, dtype=torch.long, device=self.device)
        group_index = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
        virtual_mask = torch.zeros(bsz, length, dtype=torch.long, device=self.device)
        for b, (e, g, n) in enumerate(zip(merged_embeds, virtual_groups, merged_lengths)):
            embeds[b, lm - n :] = e
            mask[b, lm - n :] = 1
            group_index[b, length - len(g) :] = g + (lm - n)
            virtual_mask[b, length - len(g) :] = 1
        if not self.vtu:
            positions = (mask.cumsum(-1) - 1).clamp_min(0)
            return LlavaInputs(embeds, mask, positions, None, visual_tokens)
        vtu = VTUInputs(group_index=group_index, attention_mask=virtual_mask, merged_length=lm, cache=self.vtu_cache)
        big = torch.iinfo(torch.long).max
        first = first_positions(group_index, lm, vtu.position_ids.masked_fill(virtual_mask == 0, big), empty=big)
        positions = first.masked_fill(mask == 0, 0)  # (B, L_m) virtual position of each token's first member
        return LlavaInputs(embeds, mask, positions, vtu, visual_tokens)

    # ------------------------------------------------------------- outputs
    @torch.no_grad()
    def forward(self, inputs: LlavaInputs):
        """One forward pass over merged inputs; returns the model output (logits ``(B, L_m, V)``)."""
        return self.model(**inputs.model_kwargs())

    @torch.no_grad()
    def generate(
        self,
        questions: Sequence[str],
        images: Sequence[Sequence[ImageLike | Video]] | Sequence[ImageLike | Video],
        max_new_tokens: int = 32,
        budget: VisualBudget | dict | None = None,
        **generate_kwargs,
    ) -> tuple[list[str], LlavaInputs]:
        """Answer questions about images (greedy by default).

        Args:
            questions: user texts (placeholders are added unless present; see :meth:`prompt`).
            images: per question a list of images (or :class:`~llava.images.Video` s), or one per question.
            max_new_tokens: answer length limit.
            budget: this request's :class:`~dymu.budget.VisualBudget` (default: the pipeline's), e.g.
                ``{"max_visual_tokens": 64}`` or ``VisualBudget(threshold_scale=1.1)``.
            generate_kwargs: passed to ``model.generate``.

        Returns:
            ``(answers, inputs)``; ``inputs.visual_tokens`` gives the visual token count per question. No
            questions (``generate([], [])``): ``([], inputs)`` with empty inputs, and the model does not run.

        Raises:
            TypeError: ``questions`` is one str rather than a list, a question is not a str, or a
                :class:`~llava.images.Video` for LLaVA-1.5.
            ValueError: questions and image lists differ in number; an empty question, or one with a lone
                surrogate or with placeholders that do not match its inputs (see :meth:`prompt`); a prompt whose
                positions plus ``max_new_tokens`` exceed the model's limit (see :meth:`build_inputs`), raised
                before the LLM runs. In eval the runner records such a sample as failed and scores the rest.
        """
        if isinstance(questions, str):
            raise TypeError("questions must be a list of questions, one per sample; got a single str: wrap it, "
                            "generate([question], [image]).")
        images = [[im] if isinstance(im, (Image.Image, str, os.PathLike, Video)) else list(im)
                  for im in images]
        if len(images) != len(questions):
            raise ValueError(f"{len(questions)} questions but {len(images)} images (or image lists); give one per "
                             "question.")
        for i, (question, imgs) in enumerate(zip(questions, images)):
            self._check_question(question, imgs, index=i)
        prompts = [self.prompt(q, imgs) for q, imgs in zip(questions, images)]
        inputs = self.build_inputs(prompts, images, budget=budget,
                                   max_new_tokens=max_new_tokens if max_new_tokens is not None else 0)
        if not prompts:
            return [], inputs
        generate_kwargs.setdefault("do_sample", False)
        generate_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        out = self.model.generate(**inputs.model_kwargs(), max_new_tokens=max_new_tokens, **generate_kwargs)
        answers = [a.strip() for a in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        return answers, inputs

    # ------------------------------------------------------------- merge maps
    @torch.no_grad()
    def merge_map(self, image: ImageLike, layers: Sequence[int] | None = None, fill: str = "mean",
                  budget: VisualBudget | dict | None = None):
        """Draw DToMe's merge groups of one image (all its crops), one row per encoder layer.

        Each crop is drawn under the rule it is encoded with: the budget goes through
        :func:`dymu.budget.encode_under_budget`, as in :meth:`build_inputs`, and a crop it encodes a second time
        (under bounds) is drawn with that pass's rule.

        Args:
            image: an image file or PIL image.
            layers: encoder layers (0-based; negative from the feature layer); default: the feature layer.
            fill: ``"mean"``, ``"distinct"`` or ``"none"`` (see :func:`dymu.vis.draw_merge_map`).
            budget: token budget to draw under (default: the pipeline's).

        Returns:
            RGB PIL image: the crop(s) the encoder sees with their groups and token counts; one crop (LLaVA-1.5):
            the layers side by side; several (LLaVA-OneVision): a row of crops per layer.

        Raises:
            ValueError: the model runs without DToMe; an invalid budget.
            NotImplementedError: token bounds on a family without them.
        """
        if not is_patched(self.tower):
            raise ValueError("merge maps need DToMe in the vision tower (load with dymu=low|mid|high or ToMe).")
        crops = self.crops(image)
        mean, std = self.image_processor.image_mean, self.image_processor.image_std
        views = [vis.image_from_pixels(c, mean, std) for c in crops]
        budget = self.request_budget(budget)
        rule, redo, bounded = None, [], None
        if not budget.is_default:
            pixels = crops.to(device=self.device, dtype=self.dtype)
            out = encode_under_budget(self.tower, pixels, budget, dropped_tokens=self.dropped_tokens)
            rule, redo, bounded = out.rule, out.reencoded, out.bounded_rule
        rows = []
        for layer in (layers if layers is not None else [None]):
            groups = vis.merge_groups(self.tower, crops, layer, merge_rule=rule)
            if redo:  # the crops the budget encoded again: their groups under that pass's rule
                again = vis.merge_groups(self.tower, crops[redo], layer, merge_rule=bounded)
                groups.labels[redo] = again.labels
                for j, i in enumerate(redo):
                    groups.num_tokens[i], groups.num_groups[i] = again.num_tokens[j], again.num_groups[j]
            names = ["image"] if len(views) == 1 else ["base"] + [f"crop {i}" for i in range(1, len(views))]
            rows.append([vis.draw_merge_map(view, labels, fill=fill,
                                            caption=f"{name}, layer {groups.layer}: {k} of {labels.numel()}")
                         for view, labels, k, name in zip(views, groups.labels, groups.num_groups, names)])
        if len(views) == 1:  # one crop: the layers side by side
            rows = [[row[0] for row in rows]]
        return vis.tile(rows)
