"""Apply and remove DyMU on transformers models, in place (ToMe-style class swaps, no new parameters)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from types import ModuleType

import torch.nn as nn
from transformers.models.clip import modeling_clip
from transformers.models.dinov2 import modeling_dinov2
from transformers.models.llama import modeling_llama
from transformers.models.qwen2 import modeling_qwen2
from transformers.models.siglip import modeling_siglip

from ..merge import FixedRRule, MergeRule, ThresholdRule
from ..thresholds import EncoderSpec, Thresholds
from . import dinov2 as _dinov2
from . import llama as _llama
from . import vit as _vit
from ._host import TESTED_TRANSFORMERS, cache_keyword, check_transformers_version
from ._swap import is_patched, restore, swap_class

__all__ = ["TESTED_TRANSFORMERS", "cache_keyword", "check_transformers_version", "is_patched", "encoder_spec", "vision_token_count", "apply_dtome", "apply_vtu", "remove", "dtome_settings", "layers_to_run", "find_vision_tower", "find_decoder"]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class _VitHost:
    """How DToMe patches one transformers ViT family: the mixin of each module, where the blocks and their
    attention live, the host module (its ``eager_attention_forward``) and whether token 0 is a never-merged CLS."""

    model: type
    layer: type
    attention: type
    module: ModuleType
    has_cls: bool
    blocks: str = "layers"  # attribute of the encoder holding the blocks
    attention_attr: str = "self_attn"  # attribute of a block holding its attention


_VIT_HOSTS = {
    modeling_clip.CLIPVisionModel: _VitHost(_vit.DToMeCLIPVisionModelMixin, _vit.DToMeEncoderLayerMixin,
                                            _vit.DToMeAttentionMixin, modeling_clip, has_cls=True),
    modeling_siglip.SiglipVisionModel: _VitHost(_vit.DToMeSiglipVisionModelMixin, _vit.DToMeEncoderLayerMixin,
                                                _vit.DToMeAttentionMixin, modeling_siglip, has_cls=False),
    modeling_dinov2.Dinov2Model: _VitHost(_dinov2.DToMeDinov2ModelMixin, _dinov2.DToMeDinov2LayerMixin,
                                          _dinov2.DToMeDinov2AttentionMixin, modeling_dinov2, has_cls=True,
                                          blocks="layer", attention_attr="attention"),
}
# host decoder class -> (attention class, host module for RoPE / eager functions)
_DECODER_HOSTS = {
    modeling_llama.LlamaModel: (modeling_llama.LlamaAttention, modeling_llama),
    modeling_qwen2.Qwen2Model: (modeling_qwen2.Qwen2Attention, modeling_qwen2),
}


def encoder_spec(vision_model: nn.Module) -> EncoderSpec:
    """:class:`~dymu.thresholds.EncoderSpec` of a supported vision model (fingerprint, layers, N0, CLS).

    Raises:
        NotImplementedError: not a supported vision model.
    """
    if _open_clip_host(vision_model):
        from . import open_clip as _oc

        return _oc.encoder_spec(vision_model)
    host = _host_entry(vision_model, _VIT_HOSTS)  # first: raises for an unsupported module
    return EncoderSpec.from_config(vision_model.config, has_cls=host.has_cls)


def vision_token_count(vision_model: nn.Module) -> tuple[int, bool]:
    """``(N0, has_cls)``: tokens per image before merging and whether token 0 is a protected CLS token.

    577 and True for CLIP ViT-L/14-336; 729 and False for SigLIP so400m/14-384; 257 and True for the testbed's
    DINOv2 ViT-S/14 at 224 px.

    Raises:
        NotImplementedError: not a supported vision model.
    """
    spec = encoder_spec(vision_model)
    return spec.num_tokens, spec.has_cls


def dtome_settings(tower: nn.Module) -> _vit.DToMeSettings:
    """The settings :func:`apply_dtome` gave a vision tower: how it merges and how many layers it runs.

    The one public way to read them (the patch keeps them on the tower); read them, do not change them: call
    :func:`apply_dtome` again to re-configure. Fields of the returned :class:`~dymu.patch.vit.DToMeSettings`:

    - ``rule``: the merge rule every forward pass uses unless given ``merge_rule``, called as
      ``rule(layer, scores, lengths) -> mask`` (:class:`~dymu.merge.MergeRule`): a :class:`~dymu.merge.ThresholdRule`
      over the first ``num_layers`` thresholds when patched with :class:`~dymu.Thresholds`, a
      :class:`~dymu.merge.FixedRRule` for ``tome_r``, or the rule object that was passed.
    - ``num_layers``: encoder layers the tower runs (:func:`layers_to_run` of the feature layer); the last one is
      the feature layer, later layers are skipped.
    - ``protect_first``: token 0 is a CLS token that never merges (CLIP, open_clip, timm with one prefix token);
      False for towers without one (SigLIP).

    Args:
        tower: the patched vision tower itself (what :func:`find_vision_tower` returns, e.g. a LLaVA model's
            ``model.model.vision_tower``), not a model holding it.

    Raises:
        ValueError: ``tower`` is not a vision tower patched with :func:`apply_dtome` (never patched, patch
            removed, a model holding the tower, the tower's encoder, a VTU-patched decoder); the message names its
            class.
    """
    settings = getattr(tower, "_dymu", None)
    if not isinstance(settings, _vit.DToMeSettings) or not hasattr(tower, "dtome_forward"):
        raise ValueError(
            f"{type(tower).__name__} is not a vision tower patched with dymu.apply_dtome, so it has no DToMe "
            "settings; pass the patched tower itself (dymu.patch.find_vision_tower(model), e.g. pipe.tower), not "
            "the model holding it."
        )
    return settings


def _open_clip_host(module: nn.Module) -> bool:
    """True for open_clip / timm ViT towers (checked by class and module name: they are optional extras)."""
    from .open_clip import is_host

    return is_host(module)


def layers_to_run(num_layers: int, feature_layer: int) -> int:
    """Encoder layers to run for a hidden-state index (``-1``: all, ``-2``: all but the last, ``k >= 1``: k).

    ``hidden_states[0]`` is the embedding output, so index ``i`` is the output of layer ``i``.

    Raises:
        ValueError: the index selects the embeddings or lies outside ``[-num_layers, num_layers]``.
    """
    n = feature_layer % (num_layers + 1) if -num_layers - 1 <= feature_layer < 0 else feature_layer
    if not 1 <= n <= num_layers:
        raise ValueError(f"feature_layer {feature_layer} does not select an encoder layer output of a "
                         f"{num_layers}-layer encoder.")
    return n


def find_vision_tower(model: nn.Module) -> nn.Module:
    """The supported vision encoder inside ``model`` (the model itself, or e.g. ``model.model.vision_tower``).

    Raises:
        NotImplementedError: no supported encoder class is found (names the classes seen).
    """
    for module in model.modules():
        if isinstance(module, tuple(_VIT_HOSTS)) or _open_clip_host(module):
            return module
    raise NotImplementedError(
        f"DToMe supports {[c.__name__ for c in _VIT_HOSTS]} and open_clip / timm VisionTransformers; none found in "
        f"{type(model).__name__}."
    )


def find_decoder(model: nn.Module) -> nn.Module:
    """The supported RoPE decoder stack inside ``model`` (e.g. ``model.model.language_model``).

    Raises:
        NotImplementedError: no supported decoder class is found.
    """
    for module in model.modules():
        if isinstance(module, tuple(_DECODER_HOSTS)):
            return module
    raise NotImplementedError(
        f"VTU supports {[c.__name__ for c in _DECODER_HOSTS]}; none found in {type(model).__name__}."
    )


def _host_entry(module: nn.Module, table: dict):
    for cls, entry in table.items():
        if isinstance(module, cls):
            return entry
    raise NotImplementedError(f"{type(module).__name__} is not supported by DyMU.")


def apply_dtome(
    model: nn.Module,
    thresholds: Thresholds | MergeRule | None = None,
    *,
    tome_r: list[int] | None = None,
    feature_layer: int | None = None,
) -> nn.Module:
    """Patch the vision encoder of ``model`` in place with DToMe (or fixed-r ToMe).

    Args:
        model: a ``CLIPVisionModel`` / ``SiglipVisionModel`` / ``Dinov2Model`` or a model containing one
            (``LlavaForConditionalGeneration``, ``LlavaOnevisionForConditionalGeneration``).
        thresholds: per-layer thresholds (:class:`~dymu.Thresholds`, validated against the encoder; a
            weights identity that differs from the tower's is logged as a WARNING, see
            :meth:`~dymu.Thresholds.check_weights`), or any merge rule callable ``rule(layer, scores, lengths) -> mask`` (:class:`~dymu.merge.MergeRule`).
        tome_r: instead of thresholds, the fixed-r ToMe baseline with per-layer budgets ``r_l``.
        feature_layer: hidden-state index that feeds the LLM; layers after it are not run. Default: the
            LLaVA config's ``vision_feature_layer`` if ``model`` is a LLaVA model, else -1.

    Returns:
        ``model`` (patched in place). The vision tower then returns
        :class:`~dymu.patch.vit.DToMeVisionOutput`.

    Raises:
        ValueError: both or neither of ``thresholds`` / ``tome_r``; a budget of the wrong length.
        ThresholdsError: thresholds made for another encoder or too few layers.
        NotImplementedError: no supported encoder in ``model``.
    """
    check_transformers_version()
    if (thresholds is None) == (tome_r is None):
        raise ValueError("apply_dtome needs exactly one of thresholds or tome_r.")
    tower = find_vision_tower(model)
    if feature_layer is None:
        feature_layer = getattr(getattr(model, "config", None), "vision_feature_layer", -1)
        if not isinstance(feature_layer, int):
            raise NotImplementedError(f"multi-layer vision features {feature_layer} are not supported by DToMe.")
    spec = encoder_spec(tower)
    n_run = layers_to_run(spec.num_layers, feature_layer)
    if tome_r is not None:
        if len(tome_r) != n_run:
            raise ValueError(f"tome_r has {len(tome_r)} entries but {n_run} encoder layers run.")
        rule: MergeRule = FixedRRule(list(tome_r))
    elif isinstance(thresholds, Thresholds):
        thresholds.check(spec, n_run)
        thresholds.check_weights(tower)  # other weights of the same geometry: a WARNING, not an error
        rule = ThresholdRule(thresholds.values[:n_run])
    else:
        rule = thresholds
    if _open_clip_host(tower):
        from . import open_clip as _oc

        _oc.patch(tower, _vit.DToMeSettings(rule, n_run, spec.has_cls))
    else:
        host = _host_entry(tower, _VIT_HOSTS)
        settings = _vit.DToMeSettings(rule, n_run, host.has_cls)
        swap_class(tower, host.model, _dymu=settings)
        swap_class(tower.encoder, _vit.DToMeEncoderMixin, _dymu=settings, _dymu_blocks=host.blocks)
        for layer in getattr(tower.encoder, host.blocks):
            swap_class(layer, host.layer)
            swap_class(getattr(layer, host.attention_attr), host.attention,
                       _dymu_eager=host.module.eager_attention_forward)
    logger.info("DToMe applied to %s: %d of %d layers run, rule %s", type(tower).__name__, n_run,
                spec.num_layers, type(rule).__name__)
    return model


def apply_vtu(model: nn.Module) -> nn.Module:
    """Patch the RoPE decoder of ``model`` in place with virtual token unmerging.

    After this, ``model(..., vtu=VTUInputs(...))`` and ``model.generate(..., vtu=...)`` run the prefill on
    merged tokens; without ``vtu`` the model behaves exactly as before.

    Args:
        model: ``LlamaModel`` / ``Qwen2Model`` or anything containing one (``LlamaForCausalLM``,
            ``Qwen2ForCausalLM``, ``LlavaForConditionalGeneration``, ...).

    Returns:
        ``model`` (patched in place).

    Raises:
        NotImplementedError: no supported decoder in ``model``.
    """
    check_transformers_version()
    decoder = find_decoder(model)
    attn_cls, host_module = _host_entry(decoder, _DECODER_HOSTS)
    swap_class(decoder, _llama.VTUDecoderMixin)
    for module in decoder.modules():
        if isinstance(module, attn_cls):
            swap_class(
                module,
                _llama.VTUAttentionMixin,
                _dymu_rope=host_module.apply_rotary_pos_emb,
                _dymu_eager=host_module.eager_attention_forward,
            )
    if model is not decoder:
        swap_class(model, _llama.VTURootMixin)
    logger.info("VTU applied to %s", type(decoder).__name__)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply_dtome` and :func:`apply_vtu` on ``model`` (restores the host classes)."""
    n = restore(model)
    logger.info("DyMU removed from %d modules", n)
    return model
